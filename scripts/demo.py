"""The README's main job: ``python scripts/demo.py`` (the same as the ``ferrovlm demo`` command).

Builds a small vision-language model from the real SmolLM2-135M-Instruct and a fresh vision tower and teaches it
to see on a CPU; see ``ferrovlm.demo`` and README "The demo"."""

from ferrovlm.demo import main, parse

if __name__ == "__main__":
    main(parse())
