"""Rebuild ``NotoSansCJKsc-Regular-subset.ttf`` from Noto Sans CJK SC.

Not imported by pdg: this is the recipe of the shipped font, kept so that the
file can be rebuilt, extended or audited. It needs only fontTools (a
dependency of fpdf2)::

    apt-get download fonts-noto-cjk unicode-data
    dpkg-deb -x fonts-noto-cjk_*.deb src && dpkg-deb -x unicode-data_*.deb src
    python billing/fonts/build_font.py \\
        src/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc \\
        src/usr/share/unicode/Unihan_OtherMappings.txt.bz2 \\
        billing/fonts/NotoSansCJKsc-Regular-subset.ttf

What it keeps of the Simplified Chinese face (see ``README.md`` beside it):
Latin with pinyin tones, punctuation, the common symbol blocks, full-width
forms, every ideograph of the CJK Unified Ideographs block (all of GBK's
hanzi), the compatibility ideographs, and every character of the 通用规范汉字表
(Unihan ``kTGH``), some of which lie in the extension blocks. Hangul, kana and
the rest of the extensions are left out: they would double the file.

The CFF outlines are converted to TrueType (quadratic) outlines, hints and
layout tables dropped: fpdf2 embeds TrueType-outline fonts as ``CIDFontType2``
with ``Identity-H``, which every reader and text extractor understands, while
its CFF path writes an encoding CMap that pypdf and pdfminer cannot read. The
build is deterministic: the same inputs give the same bytes.
"""

from __future__ import annotations

import bz2
import sys
from pathlib import Path

from fontTools import subset  # type: ignore[import-untyped]
from fontTools.pens.cu2quPen import Cu2QuPen  # type: ignore[import-untyped]
from fontTools.pens.ttGlyphPen import TTGlyphPen  # type: ignore[import-untyped]
from fontTools.ttLib import TTCollection, TTFont, newTable  # type: ignore[import-untyped]

FACE = "Noto Sans CJK SC"
#: Code point ranges kept (inclusive), besides the 通用规范汉字表.
RANGES = (
    (0x0020, 0x007E),  # ASCII
    (0x00A0, 0x024F),  # Latin-1 (yen sign), Latin Extended-A/B (pinyin tones)
    (0x02B0, 0x02FF),  # spacing modifiers (ˇ ˉ)
    (0x2000, 0x206F),  # general punctuation (dashes, quotes, ellipsis)
    (0x2100, 0x218F),  # letterlike (numero, degree Celsius), Roman numerals
    (0x2190, 0x22FF),  # arrows, mathematical operators (≤ ≥ ÷)
    (0x2460, 0x24FF),  # enclosed alphanumerics (① ②)
    (0x2500, 0x25FF),  # box drawing, geometric shapes (■ □ ○ ●)
    (0x3000, 0x303F),  # CJK symbols and punctuation (、。《》【】)
    (0x3200, 0x33FF),  # enclosed CJK (㈠ ㈱), CJK compatibility (㎡ ㎏)
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    (0xFE30, 0xFE4F),  # CJK compatibility forms
    (0xFF00, 0xFFEF),  # half-width and full-width forms
)
#: The largest deviation of a converted curve, in font units (1000 a square).
MAX_ERROR = 1.0


def tgh_characters(unihan_other_mappings: Path) -> set[int]:
    """The code points of the 通用规范汉字表 (Unihan field ``kTGH``)."""
    raw = unihan_other_mappings.read_bytes()
    if unihan_other_mappings.suffix == ".bz2":
        raw = bz2.decompress(raw)
    found = set()
    for line in raw.decode("utf-8").splitlines():
        fields = line.split("\t")
        if len(fields) == 3 and fields[1] == "kTGH":
            found.add(int(fields[0].removeprefix("U+"), 16))
    if len(found) < 8000:
        raise SystemExit(f"{unihan_other_mappings}: expected the 8105 kTGH characters, found {len(found)}")
    return found


def load_face(path: Path) -> TTFont:
    """The Simplified Chinese face of a collection, or the font itself."""
    if path.suffix.lower() in {".ttc", ".otc"}:
        for index, face in enumerate(TTCollection(str(path)).fonts):
            if face["name"].getDebugName(4) == FACE:
                return TTFont(str(path), fontNumber=index, recalcTimestamp=False)
        raise SystemExit(f"{path}: no face named {FACE!r}")
    return TTFont(str(path), recalcTimestamp=False)


def to_truetype_outlines(font: TTFont) -> None:
    """Replace the CFF table by a glyf table of the same glyphs."""
    order = font.getGlyphOrder()
    glyph_set = font.getGlyphSet()
    glyf = newTable("glyf")
    glyf.glyphOrder = order
    glyf.glyphs = {}
    for name in order:
        pen = TTGlyphPen(glyph_set)
        glyph_set[name].draw(Cu2QuPen(pen, MAX_ERROR, reverse_direction=True))
        glyf[name] = pen.glyph()
    font["glyf"] = glyf
    font["loca"] = newTable("loca")
    maxp = newTable("maxp")
    maxp.tableVersion = 0x00010000
    maxp.maxZones = 1
    for field in (
        "maxTwilightPoints",
        "maxStorage",
        "maxFunctionDefs",
        "maxInstructionDefs",
        "maxStackElements",
        "maxSizeOfInstructions",
        "maxComponentElements",
        "maxComponentDepth",
    ):
        setattr(maxp, field, 0)
    font["maxp"] = maxp
    del font["CFF "]
    font.sfntVersion = "\x00\x01\x00\x00"
    font["head"].glyphDataFormat = 0
    # No glyph names: PDF embedding addresses glyphs by index.
    font["post"].formatType = 3.0


def build(source: Path, unihan_other_mappings: Path, target: Path) -> None:
    """Write the subset of ``source`` described in the module docstring to ``target``."""
    font = load_face(source)
    cmap = font.getBestCmap()
    wanted = {c for start, end in RANGES for c in range(start, end + 1)} | tgh_characters(
        unihan_other_mappings
    )
    options = subset.Options()
    options.layout_features = []
    options.hinting = False
    options.drop_tables += ["BASE", "VORG", "vhea", "vmtx", "GSUB", "GPOS"]
    options.name_IDs = ["*"]
    options.name_languages = ["*"]
    options.notdef_outline = True
    options.recalc_timestamp = False
    subsetter = subset.Subsetter(options)
    subsetter.populate(unicodes=sorted(wanted & set(cmap)))
    subsetter.subset(font)
    to_truetype_outlines(font)
    font.save(str(target))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(
            f"usage: {sys.argv[0]} NotoSansCJK-Regular.ttc Unihan_OtherMappings.txt[.bz2] OUT.ttf"
        )
    build(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
