"""``python -m prescore.server [MODEL] [vLLM serve args...]`` (same as ``prescore-serve``)."""

from prescore.server.cli import main

if __name__ == "__main__":
    main()
