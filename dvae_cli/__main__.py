from dvae_cli.cli import run

run()
