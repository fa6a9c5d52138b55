"""`python -m exrl.serve --model DIR`: see `exrl.serve.app` for the routes and options."""
import tyro

from exrl import cli
from exrl.serve.app import ServeConfig, main

if __name__ == "__main__":
  cli.run(lambda: main(tyro.cli(ServeConfig)))
