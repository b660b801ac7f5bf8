from fpt.cli import run

run()
