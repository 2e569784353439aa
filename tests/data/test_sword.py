"""The SWORD zText reader: synthetic modules written here byte by byte, and the Debian modules when installed."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from lmforge.data.pairs import pairs
from lmforge.data.sword import entries_in, find_module, read_module, strip_osis, versification
from lmforge.errors import DataError

BOOKS = [("Gen", [2, 1]), ("Exod", [1]), ("Matt", [3])]  # Gen, Exod: Old Testament; Matt: New


def write_ztext(folder: Path, prefix: str, entries: list[str], per_block: int = 2) -> None:
    """ot|nt.bzs/.bzv/.bzz as the zText format lays them out: entries grouped into zlib blocks."""
    bzs, bzv, bzz = bytearray(), bytearray(), bytearray()
    for first in range(0, len(entries), per_block):
        raw = b""
        for text in entries[first:first + per_block]:
            data = text.encode("utf-8")
            bzv += struct.pack("<IIH", first // per_block, len(raw), len(data))
            raw += data
        packed = zlib.compress(raw)
        bzs += struct.pack("<III", len(bzz), len(packed), len(raw))
        bzz += packed
    folder.mkdir(parents=True, exist_ok=True)
    for ext, content in (("bzs", bzs), ("bzv", bzv), ("bzz", bzz)):
        (folder / f"{prefix}.{ext}").write_bytes(bytes(content))


def entries_of(books: list[tuple[str, list[int]]], verse_text) -> list[str]:
    """Entries in index order: module and testament headings, then per book its heading, per chapter its heading
    and its verses."""
    entries = ["", '<milestone type="x-importer"/>']
    for book, chapters in books:
        entries.append(f'<div osisID="{book}" sID="b" type="book"/><title type="main">The Book of {book}</title>')
        for c, n in enumerate(chapters, start=1):
            entries.append(f'<chapter osisID="{book}.{c}" sID="{book}.{c}"/>')
            entries += [verse_text(book, c, v) for v in range(1, n + 1)]
    return entries


def make_module(folder: Path, verse_text=None) -> Path:
    verse_text = verse_text or (lambda b, c, v: f'<w lemma="strong:H1">{b}</w> {c}:{v} <note>a note</note>text.')
    write_ztext(folder, "ot", entries_of(BOOKS[:2], verse_text))
    write_ztext(folder, "nt", entries_of(BOOKS[2:], verse_text), per_block=3)
    return folder


def test_strip_osis_keeps_words_and_canonical_titles_drops_notes():
    markup = ('<title canonical="true" type="psalm">A <w lemma="strong:H4210">Psalm</w> of David.</title> '
              '<divineName><w lemma="x">LORD</w></divineName> , how <transChange type="added">are</transChange> '
              'they!<note placement="foot"><reference type="annotateRef">3.1 </reference>or, many</note> ¶ '
              '¡ <w>Oh</w> &amp; ( so ) <title type="main">Genesis</title>')
    assert strip_osis(markup) == "A Psalm of David. LORD, how are they! ¡Oh & (so)"


def test_synthetic_module_reads_every_verse_in_order(tmp_path):
    module = make_module(tmp_path / "mod")
    verses = list(read_module(module, books=BOOKS))
    assert [v.ref for v in verses] == ["Gen.1.1", "Gen.1.2", "Gen.2.1", "Exod.1.1", "Matt.1.1", "Matt.1.2", "Matt.1.3"]
    assert verses[2].text == "Gen 2:1 text."
    assert verses[-1].text == "Matt 1:3 text."


def test_entry_count_of_the_kjv_versification():
    books = versification()
    assert len(books) == 66 and sum(len(c) for _, c in books) == 1189 and sum(map(sum, (c for _, c in books))) == 31102
    # the index sizes of the Debian modules' ot.bzv (24115 entries) and nt.bzv (8246)
    assert entries_in(books[:39]) == 24115 and entries_in(books[39:]) == 8246


def test_empty_entry_is_an_empty_verse(tmp_path):
    module = make_module(tmp_path / "mod", lambda b, c, v: "" if (b, c, v) == ("Gen", 1, 2) else f"{b} {c}:{v}")
    verses = {v.ref: v.text for v in read_module(module, books=BOOKS)}
    assert verses["Gen.1.2"] == "" and verses["Gen.1.1"] == "Gen 1:1"


def test_index_of_another_versification_is_refused(tmp_path):
    module = make_module(tmp_path / "mod")
    with pytest.raises(DataError, match=r"ot\.bzv: 11 entries, but the KJV versification"):
        list(read_module(module, books=[("Gen", [2, 2]), ("Exod", [1]), ("Matt", [3])]))


def test_truncated_index_names_the_file(tmp_path):
    module = make_module(tmp_path / "mod")
    (module / "nt.bzv").write_bytes((module / "nt.bzv").read_bytes()[:-3])
    with pytest.raises(DataError, match=r"nt\.bzv: .* not a whole number of 10-byte entries"):
        list(read_module(module, books=BOOKS))


def test_corrupt_block_names_the_file_and_block(tmp_path):
    module = make_module(tmp_path / "mod")
    (module / "ot.bzz").write_bytes(b"\xff" * (module / "ot.bzz").stat().st_size)
    with pytest.raises(DataError, match=r"ot\.bzz: block 2 at byte \d+ does not decompress"):
        list(read_module(module, books=BOOKS))


def test_module_found_by_abbreviation_in_mods_d(tmp_path):
    make_module(tmp_path / "modules" / "texts" / "ztext" / "tstmod")
    (tmp_path / "mods.d").mkdir()
    (tmp_path / "mods.d" / "tstmod.conf").write_text(
        "[TstMod]\nAbbreviation=TST\nDataPath=./modules/texts/ztext/tstmod/\nModDrv=zText\nVersification=KJV\n")
    data, conf = find_module("tst", root=tmp_path)
    assert data == (tmp_path / "modules/texts/ztext/tstmod").resolve() and conf["name"] == "TstMod"
    assert [v.ref for v in read_module("TstMod", root=tmp_path, books=BOOKS)][:2] == ["Gen.1.1", "Gen.1.2"]


def test_other_versification_or_missing_module_is_refused(tmp_path):
    make_module(tmp_path / "modules" / "m")
    (tmp_path / "mods.d").mkdir()
    (tmp_path / "mods.d" / "m.conf").write_text("[Vul]\nDataPath=./modules/m/\nModDrv=zText\nVersification=Vulg\n")
    with pytest.raises(DataError, match="Vulg versification; only KJV"):
        list(read_module("vul", root=tmp_path, books=BOOKS))
    with pytest.raises(DataError, match=r"SWORD module 'nope' not found .* installed: Vul"):
        find_module("nope", root=tmp_path)


# ---- the Debian packages (make install-test installs them) ------------------------------------------------

installed = pytest.mark.skipif(not Path("/usr/share/sword/mods.d/engKJV2006eb.conf").is_file() or
                               not Path("/usr/share/sword/mods.d/spaRV1909eb.conf").is_file(),
                               reason="apt-get install sword-text-kjv sword-text-sparv")


@installed
def test_debian_kjv_and_rv1909_have_every_verse():
    kjv = list(read_module("kjv"))
    rv = list(read_module("sparv"))
    assert len(kjv) == len(rv) == 31102
    assert kjv[0].text == "In the beginning God created the heaven and the earth."
    assert rv[0].text == "EN el principio crió Dios los cielos y la tierra."
    john = next(i for i, v in enumerate(kjv) if v.ref == "John.3.16")
    assert kjv[john].text.startswith("For God so loved the world")
    assert rv[john].text.startswith("Porque de tal manera amó Dios al mundo")
    assert sum(not v.text for v in kjv) == 0 and sum(not v.text for v in rv) == 18  # RV's verses numbered elsewhere


@installed
def test_bible_pairs_hold_out_whole_books(tmp_path):
    pairs(tmp_path / "p", sword="kjv,sparv", test_keys=["Ruth", "Jas"], valid_keys=["Titus"])
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert meta["counts"] == {"train": 31102 - 18 - 85 - 108 - 46, "valid": 46, "test": 85 + 108}
    assert meta["keys"]["test"] == ["Ruth", "Jas"] and "Ruth" not in meta["keys"]["train"]
    first = json.loads((tmp_path / "p" / "test.jsonl").open().readline())
    assert first["book"] == "Ruth" and first["target"].startswith("Y aconteció en los días")  # "Y ACONTECIÓ" recased


def test_pairs_match_verses_by_reference_when_one_module_lacks_a_testament(tmp_path):
    """A full Bible beside a New-Testament-only module: Matthew pairs with Matthew (never Genesis with
    Matthew, as pairing by position would), and the Old Testament verses are dropped and counted."""
    books = versification()
    split = next(i for i, (book, _) in enumerate(books) if book == "Matt")
    tagged = lambda tag: (lambda b, c, v: f"{tag} {b} {c}:{v}")  # noqa: E731
    write_ztext(tmp_path / "full", "ot", entries_of(books[:split], tagged("Ex")), per_block=200)
    write_ztext(tmp_path / "full", "nt", entries_of(books[split:], tagged("Ex")), per_block=200)
    write_ztext(tmp_path / "ntonly", "nt", entries_of(books[split:], tagged("Sp")), per_block=200)
    out = pairs(tmp_path / "out", sword=f"{tmp_path / 'full'},{tmp_path / 'ntonly'}", valid=0, test=0)
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert rows[0]["source"] == "Ex Matt 1:1" and rows[0]["target"] == "Sp Matt 1:1"
    assert all(r["source"][3:] == r["target"][3:] for r in rows)
    assert len(rows) == sum(sum(c) for _, c in books[split:])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dropped"]["verse_missing_in_target"] == sum(sum(c) for _, c in books[:split])
