"""``python -m lightning_tvlars.bench``: the accuracy benchmark without the console script."""

from lightning_tvlars.bench.accuracy import main

if __name__ == "__main__":
    main()
