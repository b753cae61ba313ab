"""``python -m conv3dt``: the command-line tool."""

from conv3dt_cli.main import main

main(prog_name="conv3dt")
