"""
The subcommands of the C{meteredrt} console script (L{meteredrt.cli}), one
module per command group, and what they share:

  - L{meteredrt.commands.registry}: declaring a command and its arguments.
  - L{meteredrt.commands.session}: the store and configuration a command
    works on, through L{meteredrt.store} like the server.
  - L{meteredrt.commands.options}: parsers of option values.
  - L{meteredrt.commands.render}: JSON and text output.
  - L{meteredrt.commands.apps}, L{meteredrt.commands.keys},
    L{meteredrt.commands.tokens}, L{meteredrt.commands.usage}: the commands.
"""
