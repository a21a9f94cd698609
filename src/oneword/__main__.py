"""`python -m oneword`: the `oneword` command where only the source tree is at hand (a GPU box with PYTHONPATH)."""

from oneword.cli import main

if __name__ == "__main__":
    main()
