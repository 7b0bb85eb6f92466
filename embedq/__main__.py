"""`python -m embedq` runs the command line."""

from embedq.cli import main

# Guarded: the tokenizer pool starts its processes with "spawn", which imports this module again.
if __name__ == "__main__":
    main()
