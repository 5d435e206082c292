"""``python -m katerchen``: the same as the ``katerchen`` console script."""

from katerchen.cli import main_entry

if __name__ == "__main__":
    main_entry()
