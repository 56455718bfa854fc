"""One module per ``int8conv`` subcommand: ``SUMMARY``, ``add_args(parser)`` and ``run(args)`` (see
``common.add_command``)."""
