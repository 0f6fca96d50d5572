"""Training data: the generated multi-domain corpus (``corpus``, one module per domain), your own
text files (``text_files``), token streams and batches (``dataset``), and the column arithmetic that
the corpus and the arithmetic tasks both write out (``arith``)."""

from workbench.data.corpus import DOMAIN_GENERATORS, DOMAINS, generate_corpus
from workbench.data.dataset import DATASET_SPLITS, TokenDataset
from workbench.data.document import Document
from workbench.data.text_files import load_text_files

__all__ = [
    "DATASET_SPLITS",
    "DOMAINS",
    "DOMAIN_GENERATORS",
    "Document",
    "TokenDataset",
    "generate_corpus",
    "load_text_files",
]
