"""tfds builders that prepare offline from `manual_dir`, stored as array_record.

Preparing needs TensorFlow (tfds writes tf.train.Example records); reading goes
through `tfds.data_source`, which does not import TensorFlow, so training does not.
"""

import hashlib
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from lmjax.registry import Registry

DATA_DIR_ENV = "LMJAX_DATA_DIR"
TFDS_DIR_ENV = "LMJAX_TFDS_DIR"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

BUILDERS: Registry[type] = Registry("tfds builder")


class MissingDataError(FileNotFoundError):
    """Raised when a dataset is neither prepared nor available to prepare offline."""


class _LocalFile:
    """Stands in for tfds's download manager: `download(url)` returns a local file."""

    def __init__(self, path: Path):
        self.path = path

    def download(self, url: str) -> str:
        del url
        return os.fspath(self.path)


@BUILDERS.register("tiny_shakespeare")
class TinyShakespeare(tfds.builder_cls("tiny_shakespeare"), skip_registration=True):
    """tfds's `tiny_shakespeare` (90/5/5 character split), preparable from `manual_dir`.

    train is nanoGPT's train split; validation + test together are nanoGPT's val split.
    """

    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place Tiny Shakespeare's input.txt in the manual directory "
        f"(lmjax uses ${DATA_DIR_ENV}/tinyshakespeare/input.txt)."
    )
    MANUAL_FILE = "input.txt"
    SHA256 = TINY_SHAKESPEARE_SHA256

    def _split_generators(self, dl_manager):
        manual = getattr(self, "_lmjax_manual_file", None)
        if manual is not None:
            return super()._split_generators(_LocalFile(manual))
        return super()._split_generators(dl_manager)  # downloads when online


class BadDataError(ValueError):
    """A data file has a row that cannot be parsed; names the file and line."""


SST2_TEXT_COLUMNS = {"train": "sentence", "dev": "content"}  # the dev file differs


def read_sst2_tsv(path: Path, text_column: str) -> list[tuple[int, str]]:
    """(label, text) rows of an SST-2 TSV; a bad row (or none) raises BadDataError naming
    file:line.

    Rows are never dropped silently: a row must be `label<TAB>text` with label 0 or 1
    and non-empty text, under a header `label<TAB>{text_column}`.
    """
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        if header != ["label", text_column]:
            raise BadDataError(f"{path}:1: header is {header}, expected "
                               f"['label', {text_column!r}]")
        for number, line in enumerate(f, start=2):
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) != 2 or fields[0] not in ("0", "1") or not fields[1].strip():
                raise BadDataError(
                    f"{path}:{number}: cannot parse row {line.rstrip()!r}: expected "
                    f"'label<TAB>text' with label 0 or 1 (fix or remove the row, then delete "
                    "the prepared copy under LMJAX_TFDS_DIR/sst2)")
            rows.append((int(fields[0]), fields[1]))
    if not rows:
        raise BadDataError(f"{path} has no rows under its header; an SST-2 file needs "
                           "'label<TAB>text' rows")
    return rows


@BUILDERS.register("sst2")
class Sst2(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """SST-2 (GLUE) sentence polarity from local TSVs: splits `train` and `validation` (dev).

    The GLUE test split has no labels and is not used.
    """

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Place GLUE SST-2's train.tsv and dev.tsv in ${DATA_DIR_ENV}/sst2/."
    )
    MANUAL_FILE = "train.tsv"
    SHA256 = None

    def _info(self):
        features = tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=["negative", "positive"]),
            "idx": tfds.features.Scalar(dtype=np.int32),
        })
        return tfds.core.DatasetInfo(builder=self, features=features,
                                     supervised_keys=("text", "label"))

    def _split_generators(self, dl_manager):
        folder = Path(getattr(self, "_lmjax_manual_file", None) or
                      Path(dl_manager.manual_dir) / self.MANUAL_FILE).parent
        for name in ("train", "dev"):
            if not (folder / f"{name}.tsv").exists():
                raise MissingDataError(f"{folder / f'{name}.tsv'} does not exist; "
                                       f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        return {"train": self._generate_examples(folder / "train.tsv", "train"),
                "validation": self._generate_examples(folder / "dev.tsv", "dev")}

    def _generate_examples(self, path: Path, kind: str):
        for index, (label, text) in enumerate(read_sst2_tsv(path, SST2_TEXT_COLUMNS[kind])):
            yield index, {"text": text, "label": label, "idx": index}


def read_examples(name: str, split: str, tfds_dir: str | None = None) -> list[dict]:
    """All examples of a split of a prepared dataset (in its stored order), without TensorFlow."""
    builder = BUILDERS.get(name)(data_dir=tfds_dir or default_tfds_dir(),
                                 file_format="array_record")
    source = builder.as_data_source(split=split)
    return source.__getitems__(list(range(len(source))))


def default_tfds_dir() -> str:
    return os.environ.get(TFDS_DIR_ENV) or os.path.expanduser("~/tensorflow_datasets")


def default_manual_dir(name: str) -> Path | None:
    root = os.environ.get(DATA_DIR_ENV)
    return Path(root) / name.replace("_", "") if root else None


def _check_manual_file(builder_cls: type, manual_dir: Path) -> Path:
    path = manual_dir / builder_cls.MANUAL_FILE
    if builder_cls.SHA256 is None:  # files that users may legitimately replace
        return path
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != builder_cls.SHA256:
        raise MissingDataError(
            f"{path} has sha256 {digest}, expected {builder_cls.SHA256}; replace it with the "
            "original file"
        )
    return path


def prepare(name: str, tfds_dir: str | None = None, manual_dir: str | None = None):
    """Returns a prepared builder, preparing it from `manual_dir` (or by download) if needed."""
    builder_cls = BUILDERS.get(name)
    builder = builder_cls(data_dir=tfds_dir or default_tfds_dir(), file_format="array_record")
    if builder.is_prepared():
        return builder
    manual = Path(manual_dir) if manual_dir else default_manual_dir(name)
    if manual is not None:
        # An offline data folder was given: never fall back to a download that may hang.
        if not (manual / builder_cls.MANUAL_FILE).exists():
            raise MissingDataError(
                f"dataset {name!r} is not prepared in {builder.data_dir} and "
                f"{manual / builder_cls.MANUAL_FILE} does not exist. Put "
                f"{builder_cls.MANUAL_FILE} there, or point {DATA_DIR_ENV} at the folder that "
                f"holds {name.replace('_', '')}/{builder_cls.MANUAL_FILE} (tfds manual_dir)."
            )
        builder._lmjax_manual_file = _check_manual_file(builder_cls, manual)
        builder.download_and_prepare()
        return builder
    try:
        builder.download_and_prepare()
    except Exception as err:  # offline machines fail here with a network error
        raise MissingDataError(
            f"dataset {name!r} is not prepared in {builder.data_dir} and could not be "
            f"downloaded ({type(err).__name__}). Set {DATA_DIR_ENV} to the folder that holds "
            f"{name.replace('_', '')}/{builder_cls.MANUAL_FILE} (tfds manual_dir)."
        ) from err
    return builder


def read_text(name: str, split: str, tfds_dir: str | None = None) -> str:
    """The text of a split of a prepared single-document dataset, read without TensorFlow."""
    source = tfds.data_source(name, split=split, data_dir=tfds_dir or default_tfds_dir(),
                              download=False, builder_kwargs={"file_format": "array_record"})
    return "".join(source[i]["text"].decode("utf-8") for i in range(len(source)))


WIKITEXT2_SHA256 = {
    "valid.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "test.txt": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
}


@BUILDERS.register("wikitext2")
class Wikitext2(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """WikiText-2 (raw) validation and test articles, one example per article.

    Only these two splits are available offline (the training split is not); lmjax uses
    them as BERT pretraining text. Articles start at top-level ` = Title = ` lines.
    """

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Place WikiText-2 raw's valid.txt and test.txt in ${DATA_DIR_ENV}/wikitext2/."
    )
    MANUAL_FILE = "valid.txt"
    SHA256 = WIKITEXT2_SHA256["valid.txt"]

    def _info(self):
        features = tfds.features.FeaturesDict(
            {"title": tfds.features.Text(), "text": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        manual = getattr(self, "_lmjax_manual_file", None)
        folder = Path(manual).parent if manual else Path(dl_manager.manual_dir)
        test = folder / "test.txt"
        if not test.exists():
            raise MissingDataError(f"{test} does not exist; {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        digest = hashlib.sha256(test.read_bytes()).hexdigest()
        if digest != WIKITEXT2_SHA256["test.txt"]:
            raise MissingDataError(f"{test} has sha256 {digest}, expected "
                                   f"{WIKITEXT2_SHA256['test.txt']}; replace it with the original")
        return {"validation": self._generate_examples(folder / "valid.txt"),
                "test": self._generate_examples(test)}

    def _generate_examples(self, path: Path):
        for index, (title, text) in enumerate(wikitext_articles(path.read_text("utf-8"))):
            yield index, {"title": title, "text": text}


def _is_title(line: str) -> bool:
    """` = Title = ` (top level); section headings are ` = = Section = = `."""
    stripped = line.strip()
    return (stripped.startswith("= ") and stripped.endswith(" =")
            and not stripped.startswith("= ="))


def wikitext_articles(text: str) -> list[tuple[str, str]]:
    """(title, body) per article; the body keeps section headings and paragraph lines."""
    articles: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if _is_title(line):
            articles.append((line.strip().strip("=").strip(), []))
        elif articles and line.strip():
            articles[-1][1].append(line.strip())
    return [(title, "\n".join(lines)) for title, lines in articles]


MULTI30K_LANGUAGES = ("en", "de", "fr")
# tfds split name -> the corpus's file stem (test_2016_flickr is the usual test set).
MULTI30K_SPLITS = {"train": "train", "validation": "val", "test": "test_2016_flickr"}


def read_parallel(folder: Path, stem: str, languages: tuple[str, ...]) -> list[list[str]]:
    """The lines of `folder/stem.{lang}` per language, which must all have as many lines.

    A missing file raises MissingDataError naming where it goes; files of different
    lengths raise BadDataError naming each file and its line count."""
    texts = []
    for lang in languages:
        path = folder / f"{stem}.{lang}"
        if not path.exists():
            raise MissingDataError(f"{path} does not exist; put Multi30k's {stem}.{lang} there "
                                   f"(or point {DATA_DIR_ENV} at the folder that holds "
                                   f"multi30k/{stem}.{lang})")
        texts.append(path.read_text("utf-8").rstrip("\n").split("\n"))
    counts = {f"{stem}.{lang}": len(lines) for lang, lines in zip(languages, texts, strict=True)}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{folder / name} has {n} lines" for name, n in counts.items())
        raise BadDataError(f"the sides of a parallel corpus must have as many lines: {listed}")
    return texts


@BUILDERS.register("multi30k")
class Multi30k(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Multi30k task 1 (Elliott et al. 2016): English image descriptions with German and
    French translations, raw cased text. Splits `train` (29,000 pairs), `validation`
    (val, 1,014) and `test` (test_2016_flickr, 1,000); every example holds all three
    languages, and the language pair is chosen when reading (lmjax/data/translation.py).
    """

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Place Multi30k's {{train,val,test_2016_flickr}}.{{en,de,fr}} in "
        f"${DATA_DIR_ENV}/multi30k/."
    )
    MANUAL_FILE = "train.en"
    SHA256 = None

    def _info(self):
        features = tfds.features.FeaturesDict(
            {**{lang: tfds.features.Text() for lang in MULTI30K_LANGUAGES},
             "idx": tfds.features.Scalar(dtype=np.int32)})  # the line number, from 0
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        folder = Path(getattr(self, "_lmjax_manual_file", None) or
                      Path(dl_manager.manual_dir) / self.MANUAL_FILE).parent
        texts = {split: read_parallel(folder, stem, MULTI30K_LANGUAGES)
                 for split, stem in MULTI30K_SPLITS.items()}  # every file checked first
        return {split: self._generate_examples(lines) for split, lines in texts.items()}

    def _generate_examples(self, lines: list[list[str]]):
        for index, row in enumerate(zip(*lines, strict=True)):
            yield index, {**dict(zip(MULTI30K_LANGUAGES, row, strict=True)), "idx": index}
