"""One module per ``int8conv`` subcommand; each exposes ``add_parser(subparsers)`` and sets ``func``."""
