"""``python -m kaon``: the ``kaon`` command."""

from kaon.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
