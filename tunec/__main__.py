"""``python -m tunec …`` (what ``torchrun -m tunec run OUT`` starts in every process)."""

from tunec.cli import main

if __name__ == "__main__":
    main()
