"""vlp: vision-language pretraining toolkit."""

__version__ = "0.1.0"
