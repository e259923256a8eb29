"""The ImageNet-1k hashtag vocabulary (IG-N-Targeted) and tag extraction.

Uses only the committed pipeline/data/imagenet_hashtags.json: neither timm nor WordNet is needed.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from pipeline.data.hashtags import (
    Vocabulary,
    canonicalize,
    default_path,
    extract_tags,
    load_vocabulary,
)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_hashtag_vocab.py"


@pytest.fixture(scope="module")
def raw() -> dict:
    with open(default_path(), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return load_vocabulary()


def index_of(vocab: Vocabulary, wnid: str) -> int:
    return vocab.synsets.index(wnid)


# --- the committed vocabulary -------------------------------------------------------------


def test_vocabulary_size(vocab, raw):
    assert vocab.num_classes == raw["num_classes"] == 1000
    assert len(vocab.synsets) == len(set(vocab.synsets)) == len(vocab.class_names) == 1000
    assert len(vocab) == len(raw["hashtags"]) == 1804  # what build_hashtag_vocab.py printed
    assert 1000 <= len(vocab) <= 3000
    # timm's ImageNet-1k order: tench first, toilet tissue last.
    assert vocab.synsets[0] == "n01440764" and vocab.class_names[0] == "tench"
    assert vocab.synsets[-1] == "n15075141"
    # Every class is reachable by at least one hashtag.
    assert {c for cs in vocab.hashtags.values() for c in cs} == set(range(1000))


def test_known_mappings(vocab):
    tabby = index_of(vocab, "n02123045")
    assert tabby == 281 and vocab.class_names[tabby] == "tabby"
    assert vocab.classes_of("tabby") == vocab.classes_of("tabbycat") == (tabby,)
    golden = index_of(vocab, "n02099601")
    assert golden == 207 and vocab.classes_of("goldenretriever") == (golden,)
    assert vocab.classes_of("#Golden_Retriever") == (golden,)  # input is canonicalised
    assert vocab.classes_of("Jack-O'-Lantern") == (index_of(vocab, "n03590841"),)
    assert vocab.classes_of("R.V.") == (index_of(vocab, "n04065272"),)  # "R.V." lemma -> "rv"


def test_hashtags_shared_by_several_classes(vocab):
    crane_bird, crane_machine = index_of(vocab, "n02012849"), index_of(vocab, "n03126707")
    assert vocab.classes_of("crane") == tuple(sorted((crane_bird, crane_machine))) == (134, 517)
    assert vocab.classes_of("maillot") == (638, 639)
    # Cardigan the corgi breed and cardigan the sweater.
    assert vocab.classes_of("cardigan") == (index_of(vocab, "n02113186"), index_of(vocab, "n02963159"))


def test_unknown_and_contains(vocab):
    assert vocab.classes_of("instagood") == ()
    assert vocab.classes_of("") == ()
    assert "crane" in vocab and "#CRANE" in vocab and "Golden Retriever" in vocab
    assert "instagood" not in vocab and "" not in vocab and 3 not in vocab


def test_match(vocab):
    tags, classes = vocab.match(["#Crane", "sunset", "tabby_cat", "crane", "goldenretriever"])
    assert tags == ["crane", "goldenretriever", "tabbycat"]
    assert classes == [134, 207, 281, 517]
    assert vocab.match(["sunset", "love", ""]) == ([], [])
    assert vocab.match([]) == ([], [])


def test_committed_file_is_canonical_and_sorted(raw):
    tags = list(raw["hashtags"])
    assert tags == sorted(tags)
    assert all(t == canonicalize(t) and t for t in tags)
    assert all(v == sorted(set(v)) for v in raw["hashtags"].values())


# --- canonicalize ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("#Golden_Retriever", "goldenretriever"),
        ("jack-o'-lantern", "jackolantern"),
        ("Café", "cafe"),
        ("CRÈME brûlée", "cremebrulee"),
        ("Ｇｏｌｄｅｎ", "golden"),  # full-width letters fold via NFKD
        ("Straße", "strasse"),
        ("iPhone 11 Pro!", "iphone11pro"),
        ("R.V.", "rv"),
        ("tabby cat", "tabbycat"),
        ("##dog", "dog"),
        ("🐶", ""),
        ("猫", ""),
        ("#", ""),
        ("", ""),
    ],
)
def test_canonicalize(tag, expected):
    assert canonicalize(tag) == expected


def test_canonicalize_odd_types():
    assert canonicalize(None) == "" and canonicalize(42) == ""


# --- extract_tags ---------------------------------------------------------------------------


def test_extract_from_list_field():
    assert extract_tags({"tags": ["#Dog", "golden retriever", "dog", 7, None, "🐶"]}, None) == [
        "dog", "goldenretriever"]


def test_extract_from_string_field():
    assert extract_tags({"tags": "#dog  cat\tcrane"}, None) == ["dog", "cat", "crane"]
    # With commas, spaces inside a tag are kept together.
    assert extract_tags({"tags": "golden retriever, tabby cat,,"}, None) == [
        "goldenretriever", "tabbycat"]


def test_extract_from_dotted_and_custom_field():
    meta = {"meta": {"tags": ["crane"], "other": "x"}, "labels": "hen"}
    assert extract_tags(meta, None, field="meta.tags") == ["crane"]
    assert extract_tags(meta, None, field="labels") == ["hen"]
    assert extract_tags({"meta.tags": ["ox"]}, None, field="meta.tags") == ["ox"]  # literal key
    assert extract_tags(meta, None, field="meta.missing") == []
    assert extract_tags(meta, None, field="meta.other.deeper") == []


def test_extract_from_caption():
    caption = "Our #GoldenRetriever met a #café #crane_bird! #2019 #🐶 email@x.com #"
    assert extract_tags(None, caption) == ["goldenretriever", "cafe", "cranebird", "2019"]


def test_extract_dedup_keeps_first_seen_order():
    meta = {"tags": ["Crane", "hen", "#crane"]}
    assert extract_tags(meta, "#HEN #ox #crane #Ox") == ["crane", "hen", "ox"]


@pytest.mark.parametrize(
    ("meta", "caption"),
    [
        (None, None),
        ({}, ""),
        ({"tags": None}, 42),
        ({"tags": 3.5}, None),
        ({"tags": {"a": 1}}, ["#dog"]),
        ("not a dict", b"#dog"),
        ([1, 2], None),
    ],
)
def test_extract_odd_types_never_raise(meta, caption):
    assert extract_tags(meta, caption) == []


# --- load_vocabulary errors -----------------------------------------------------------------


def test_load_missing_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_vocabulary(str(missing))


def test_load_invalid_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_vocabulary(str(bad))


def small_doc(**changes) -> dict:
    doc = {"num_classes": 2, "synsets": ["n00000001", "n00000002"], "class_names": ["a", "b"],
           "hashtags": {"crane": [1, 0], "hen": [1]}}
    doc.update(changes)
    return doc


@pytest.mark.parametrize(
    "doc",
    [
        [1, 2],
        {"synsets": []},
        small_doc(hashtags={"Crane": [0]}),  # not canonical
        small_doc(hashtags={"crane": [2]}),  # index out of range
        small_doc(hashtags={"crane": []}),
        small_doc(hashtags={"crane": ["0"]}),
        small_doc(hashtags=["crane"]),
        small_doc(class_names=["a"]),
        small_doc(num_classes=1000),
    ],
)
def test_load_malformed(tmp_path, doc):
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="vocab.json"):
        load_vocabulary(str(path))


def test_load_small_file(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(small_doc()))
    vocab = load_vocabulary(str(path))
    assert len(vocab) == 2 and vocab.classes_of("crane") == (0, 1)


# --- the build script, on a tiny synthetic WordNet (no timm or wordnet-base needed) ---------


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("build_hashtag_vocab", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DATA_NOUN = """\
  1 This software and database is being provided to you, the LICENSEE, by
02012849 05 n 01 crane 0 004 @ 02000954 n 0000 | large long-necked wading bird
02123045 05 n 02 tabby 1 tabby_cat 0 001 @ 02121808 n 0000 | a cat with a grey coat
03126707 06 n 01 crane 0 004 @ 03664675 n 0000 | lifts and moves heavy objects
03590841 06 n 02 jack-o'-lantern 0 R.V.(p) 0 001 @ 03636248 n 0000 | a lantern
"""


def test_build_script(script, tmp_path):
    synsets, wordnet, out = tmp_path / "synsets.txt", tmp_path / "data.noun", tmp_path / "v.json"
    synsets.write_text("n02123045\nn02012849\nn03126707\nn03590841\n")
    wordnet.write_text(DATA_NOUN)
    script.main(["--synsets", str(synsets), "--wordnet", str(wordnet), "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["class_names"] == ["tabby", "crane", "crane", "jack-o'-lantern"]
    assert doc["hashtags"] == {"crane": [1, 2], "jackolantern": [3], "rv": [3], "tabby": [0],
                               "tabbycat": [0]}
    assert out.read_text().count("\n") > 10  # one entry per line, for diffs
    assert len(load_vocabulary(str(out))) == 5


def test_build_script_missing_wnid(script, tmp_path):
    synsets, wordnet = tmp_path / "synsets.txt", tmp_path / "data.noun"
    synsets.write_text("n02123045\nn09999999\n")
    wordnet.write_text(DATA_NOUN)
    with pytest.raises(SystemExit, match="n09999999"):
        script.main(["--synsets", str(synsets), "--wordnet", str(wordnet),
                     "--out", str(tmp_path / "v.json")])
