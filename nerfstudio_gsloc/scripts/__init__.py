"""The command-line tools (thin tyro entry points). Importing this package sets up what every command shares
before its heavy imports: the known third-party deprecation warnings are hidden and Ctrl-C during start-up is one
line (see :mod:`nerfstudio_gsloc.startup`)."""

from nerfstudio_gsloc.startup import install_interrupt_hook, silence_known_warnings

silence_known_warnings()
install_interrupt_hook()
