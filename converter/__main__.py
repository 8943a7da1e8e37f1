"""`python -m effconv`: the `effconv` command, as `torchrun ... -m effconv eval ...` starts it."""

from effconv.cli import main

if __name__ == "__main__":
    main(prog_name="effconv")
