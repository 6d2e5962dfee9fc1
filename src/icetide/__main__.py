"""``python -m icetide``: the same as the ``icetide`` command."""

from .cli.main import main

if __name__ == "__main__":
    main()
