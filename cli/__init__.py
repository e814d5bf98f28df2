"""What every command of the project shares: the error type a user can fix (`cli.errors`),
argparse flags generated from typed dataclasses (`cli.arguments`), the common ending of a
command's `main()` (`cli.run`), and the command lines that messages tell users to run
(`cli.commands`). Imports nothing of the project, so every package may import it."""
