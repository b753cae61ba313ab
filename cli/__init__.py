"""The conv3dt command-line front end (installed as the ``conv3dt_cli`` package)."""
