"""Developer tools that ship with the package (docs generation), and the CLIs' console."""
