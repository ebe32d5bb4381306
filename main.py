"""Command-line entry point (grows with the CLI issue)."""

from absl import app


def main(argv):
  del argv


if __name__ == "__main__":
  app.run(main)
