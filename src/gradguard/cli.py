"""Command line: ``gradguard demo | lab | doctor | report`` (also ``python -m gradguard``).

Each command imports its implementation lazily, so ``gradguard --help`` stays fast and a command's
optional dependencies are only needed when it runs.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="gradguard: see, stop, explain and prevent exploding gradients in PyTorch training.",
)


@app.command()
def demo(
    steps: int = typer.Option(300, help="Training steps per run."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Train a tanh RNN on the adding problem at an exploding learning rate, unguarded and guarded."""
    from gradguard.demo import run_demo

    run_demo(steps=steps, seed=seed)


# --- lab command (issue 5) ---

# --- doctor command (issue 4) ---

# --- report command (issue 6) ---


def main() -> None:
    app()


if __name__ == "__main__":
    main()
