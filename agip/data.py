"""Corpora for the harness: the embedded ``wiki-mini``, WikiText-2 (with a network), or
the user's own text files. Each loader returns ``{"train", "validation", "test"}`` ->
list of documents (strings).

``wiki-mini`` (docs/design.md, "The embedded default"): the 107 Wikipedia articles inside
gensim's wheel (``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``,
text CC BY-SA), wiki markup removed by ``gensim.corpora.wikicorpus.filter_wiki`` and
:func:`clean_wiki`, redirects dropped, split by article deterministically: articles
sorted by title, every 10th (index % 10 == 8) to validation, (== 9) to test, the rest
to train.
"""
from __future__ import annotations

import bz2
import os
import re
from typing import Dict, List

SPLITS = ("train", "validation", "test")
GENSIM_WIKI = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def clean_wiki(text: str) -> str:
    """Remove what ``filter_wiki`` leaves: bold/italic quotes, ``== headings ==`` (kept as
    plain lines), image-caption remnants (``...|alt=...``), blank-line runs."""
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^\s*=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if "|" not in ln and not ln.startswith(("thumb", "Image:", "File:"))]
    text = "\n".join(lines)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def wiki_mini() -> Dict[str, List[str]]:
    """The embedded corpus (see module docstring)."""
    try:
        import gensim
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError:
        raise RuntimeError("the embedded corpus 'wiki-mini' needs gensim: pip install gensim") from None
    path = os.path.join(os.path.dirname(gensim.__file__), GENSIM_WIKI)
    if not os.path.exists(path):
        raise RuntimeError(f"gensim is installed but its Wikipedia excerpt is missing ({path}); reinstall gensim")
    articles = []
    with bz2.BZ2File(path) as f:
        for title, text, _ in extract_pages(f, filter_namespaces=("0",)):
            body = filter_wiki(text)
            if body.strip().lower().startswith("#redirect"):
                continue
            body = clean_wiki(body)
            if body:
                articles.append((title, f"{title}\n\n{body}"))
    articles.sort()
    out = {s: [] for s in SPLITS}
    for i, (_, doc) in enumerate(articles):
        out["validation" if i % 10 == 8 else "test" if i % 10 == 9 else "train"].append(doc)
    return out


def wikitext2(config: str = "wikitext-2-raw-v1") -> Dict[str, List[str]]:
    """WikiText-2 through ``datasets`` (needs a network on first use)."""
    try:
        import datasets
    except ImportError:
        raise RuntimeError(f"--dataset {config} needs the datasets package: pip install datasets") from None
    try:
        ds = datasets.load_dataset("wikitext", config)
    except Exception as e:
        raise RuntimeError(
            f"could not load WikiText ({config}) from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Without a network use the embedded corpus (--dataset wiki-mini) or your own files (--dataset PATH)"
        ) from None
    # every line, empty ones included, joined with "\n\n" by the protocol: exactly the Hugging
    # Face perplexity guide's and SparseGPT's "\n\n".join(test["text"]), so figures compare
    return {s: list(ds[s]["text"]) for s in SPLITS}


def text_files(path: str) -> Dict[str, List[str]]:
    """The user's text: a folder with ``train.txt``, ``validation.txt`` (or ``valid.txt``)
    and ``test.txt``; or one file, split by blank-line paragraphs 80/10/10 (every 10th
    paragraph from the 9th to validation, from the 10th to test)."""
    if os.path.isdir(path):
        out = {}
        for split, names in (("train", ("train.txt",)), ("validation", ("validation.txt", "valid.txt")),
                             ("test", ("test.txt",))):
            found = [os.path.join(path, n) for n in names if os.path.exists(os.path.join(path, n))]
            if not found:
                raise RuntimeError(f"{path} has no {' or '.join(names)}; a corpus folder needs train, validation and test files")
            with open(found[0], encoding="utf-8") as f:
                out[split] = [p for p in re.split(r"\n\s*\n", f.read()) if p.strip()]
        return out
    with open(path, encoding="utf-8") as f:
        paragraphs = [p for p in re.split(r"\n\s*\n", f.read()) if p.strip()]
    out = {s: [] for s in SPLITS}
    for i, p in enumerate(paragraphs):
        out["validation" if i % 10 == 8 else "test" if i % 10 == 9 else "train"].append(p)
    return out


def pydoc_topics() -> Dict[str, List[str]]:
    """``pydoc``: the documentation topics that ship with Python (``pydoc_data.topics``,
    ~80 topics of technical English), an *evaluation-only* out-of-domain corpus: a pruner
    tuned to the fine-tuning text can keep its in-domain perplexity while losing general
    ability. Split by sorted topic name, alternately, into validation and test; the train
    split is empty (never trained on)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    docs = [topics[n].strip() for n in names]
    return {"train": [], "validation": docs[0::2], "test": docs[1::2]}


EVAL_ONLY = ("pydoc",)


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is plainly a path (absolute, ``./``, ``../``, ``~``), never a hub name."""
    return isinstance(name, str) and (os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\", "..\\"))
                                      or name in (".", ".."))


def check_corpus_name(name: str) -> None:
    """Refuse a corpus name :func:`load_corpus` cannot read, without reading anything."""
    if looks_like_path(name) and not os.path.exists(os.path.expanduser(name)):
        raise ValueError(f"dataset {name}: the path does not exist. Give a text file, a folder with train.txt / "
                         "validation.txt / test.txt, or 'wiki-mini' (embedded)")
    if not isinstance(name, str) or not (name in ("wiki-mini", "pydoc") or name.startswith("wikitext-")
                                         or os.path.exists(os.path.expanduser(name))):
        raise ValueError(
            f"unknown dataset {name!r}: use 'wiki-mini' (embedded), 'pydoc' (embedded, evaluation only), "
            "'wikitext-2-raw-v1' (needs a network), or a path to a text file or a folder with train.txt / "
            "validation.txt / test.txt"
        )


def load_corpus(name: str) -> Dict[str, List[str]]:
    """``wiki-mini`` (embedded), ``pydoc`` (embedded, evaluation only), ``wikitext-2-raw-v1``
    / ``wikitext-103-raw-v1`` (hub), or a path to the user's text. Every split must hold
    some text (an evaluation-only corpus has no train split)."""
    if name == "wiki-mini":
        corpus = wiki_mini()
    elif name == "pydoc":
        corpus = pydoc_topics()
    elif name.startswith("wikitext-"):
        corpus = wikitext2(name)
    else:
        check_corpus_name(name)
        corpus = text_files(os.path.expanduser(name))
    empty = [s for s in SPLITS if not "".join(corpus[s]).strip() and not (s == "train" and name in EVAL_ONLY)]
    if empty:
        raise ValueError(f"dataset {name!r}: the {', '.join(empty)} split is empty; give it some text")
    return corpus


def join(docs: List[str]) -> str:
    """docs/design.md's evaluation protocol: documents joined with blank lines."""
    return "\n\n".join(docs)
