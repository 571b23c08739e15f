"""Billing documents as PDF (billing.pdf): what a reader gets back from them.

Each document is rendered, its text extracted with pypdf (an independent PDF
parser), and the text checked for what a finance user needs to make a
fapiao: numbers, both parties and their credit codes, every line, totals in
figures and in capital numerals. Whitespace is ignored when comparing, since
table cells wrap long names over lines.
"""

# Chinese text takes full-width commas, colons and brackets.
# ruff: noqa: RUF001

from __future__ import annotations

import functools
import io
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from fontTools.ttLib import TTFont  # type: ignore[import-untyped]
from pypdf import PdfReader

from billing.pdf import FONT_PATH, capital_yuan, cny, invoice_pdf, note_pdf, statement_pdf, yuan

SELLER = {
    "name": "某市公共数据运营有限公司",
    "credit_code": "91110000MA01ABCD1X",
    "address": "某市某区数据大道 88 号 010-88886666",
    "bank": "中国工商银行某市分行营业部",
    "account": "0200001234567890123",
}
# A name with characters outside GB 2312, one of them outside the BMP (U+2CB5A).
BUYER = {
    "name": "喆堃𬭚智能科技有限公司",
    "credit_code": "91110108MA02WXYZ9K",
    "address": "某市海淀区中关村大街 1 号",
    "bank": "招商银行某市中关村支行",
    "account": "110912345678901",
}


def _line(number: int, name: str, dataset: str, amount_fen: int, **extra: Any) -> dict[str, Any]:
    return {
        "line_no": number,
        "dataset": dataset,
        "dataset_name": name,
        "purpose": "industrial",
        "kind": "usage",
        "usage_period": "2026-11",
        "calls": 1200,
        "records": 3400,
        "tax_code": "3040203000000000000",
        "vat_rate": "0.06",
        "amount_fen": amount_fen,
        "charge_e4": str(amount_fen * 10_000),
        **extra,
    }


def _invoice(lines: list[dict[str, Any]]) -> dict[str, Any]:
    subtotal = sum(line["amount_fen"] for line in lines)
    vat = (subtotal * 6 + 50) // 100
    return {
        "number": "PDG-2026-000017",
        "id": "inv-2026-11-lic-0042",
        "period": "2026-11",
        "status": "issued",
        "issued_at": "2026-12-02T08:00:00Z",
        "due_at": "2027-01-01",
        "currency": "CNY",
        "seller": SELLER,
        "buyer": BUYER,
        "lines": lines,
        "subtotal_fen": subtotal,
        "vat_rate": "0.06",
        "vat_fen": vat,
        "total_fen": subtotal + vat,
        "content_hash": "9f2c" * 16,
        "signature": "MEUCIQ" + "Ab3dEf9+/" * 12 + "==",
        "a_future_field": {"ignored": True},
    }


INVOICE = _invoice(
    [
        _line(1, "企业登记信息", "ent-registry", 123456),
        _line(
            2,
            "市场主体信用信息（含行政处罚、经营异常名录及严重违法失信名单历史记录）",
            "social-credit-history",
            0,
            purpose="public-interest",
            kind="late",
            usage_period="2026-10",
        ),
        _line(3, "地理兴趣点", "geo-poi", 9876500),
    ]
)


def _note(kind: str) -> dict[str, Any]:
    return {
        "number": "PDG-CN-2026-000003" if kind == "credit" else "PDG-DN-2026-000004",
        "id": f"{kind[0]}n-2026-11-lic-0042-1",
        "kind": kind,
        "invoice_number": "PDG-2026-000017",
        "invoice_id": "inv-2026-11-lic-0042",
        "reason": "上游接口故障期间的调用返回了空结果，按服务协议第 7.2 条予以调整。",
        "issued_at": "2026-12-10T02:30:00Z",
        "seller": SELLER,
        "buyer": BUYER,
        "line_no": 1,
        "dataset": "ent-registry",
        "dataset_name": "企业登记信息",
        "purpose": "industrial",
        "amount_fen": 123456,
        "vat_rate": "0.06",
        "vat_fen": 7407,
        "total_fen": 130863,
        "currency": "CNY",
        "content_hash": "ab12" * 16,
    }


STATEMENT = {
    "licensee": {"id": "lic-0042", "name": BUYER["name"], "credit_code": BUYER["credit_code"]},
    "from": "2026-01",
    "to": "2026-11",
    "currency": "CNY",
    "generated_at": "2026-12-15T01:00:00Z",
    "entries": [
        {
            "date": "2026-12-02",
            "kind": "invoice",
            "number": "PDG-2026-000017",
            "amount_fen": 10599953,
            "balance_fen": 10599953,
        },
        {
            "date": "2026-12-10",
            "kind": "credit-note",
            "number": "PDG-CN-2026-000003",
            "amount_fen": -130863,
            "balance_fen": 10469090,
        },
        {
            "date": "2026-12-12",
            "kind": "payment",
            "number": "BANK-20261212-01",
            "amount_fen": -10469090,
            "balance_fen": 0,
        },
    ],
    "balance_fen": 0,
}


@functools.cache
def _rendered(kind: str, lang: str) -> bytes:
    """One rendering of each sample document, shared by the tests that only read it."""
    if kind == "invoice":
        return invoice_pdf(INVOICE, lang=lang)
    if kind == "statement":
        return statement_pdf(STATEMENT, lang=lang)
    return note_pdf(_note(kind), lang=lang)


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _pages(pdf: bytes) -> list[str]:
    assert pdf.startswith(b"%PDF-")
    return [_squash(page.extract_text()) for page in PdfReader(io.BytesIO(pdf)).pages]


def _assert_holds(text: str, *expected: str) -> None:
    missing = [item for item in expected if _squash(item) not in text]
    assert not missing, f"missing from the PDF's text: {missing}\ntext: {text}"


# -- money ----------------------------------------------------------------------------


def test_money_is_formatted_from_integer_fen() -> None:
    assert [yuan(v) for v in (0, 5, -5, 123456, 100_000_000_00)] == [
        "0.00",
        "0.05",
        "-0.05",
        "1,234.56",
        "100,000,000.00",
    ]
    assert cny(123456) == "¥1,234.56"
    assert cny(-130863) == "-¥1,308.63"
    assert cny(100, "USD") == "USD 1.00"
    for bad in (1.5, True, "100"):
        with pytest.raises(TypeError):
            yuan(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fen", "words"),
    [
        # The first four are the examples of the rules for writing amounts on
        # bills and vouchers (正确填写票据和结算凭证的基本规定), in one of the forms they allow.
        (140950, "壹仟肆佰零玖元伍角"),
        (600714, "陆仟零柒元壹角肆分"),
        (168032, "壹仟陆佰捌拾元零叁角贰分"),
        (10700053, "壹拾万柒仟元零伍角叁分"),
        (1600, "壹拾陆元整"),
        (32504, "叁佰贰拾伍元零肆分"),
        (0, "零元整"),
        (5, "伍分"),
        (56, "伍角陆分"),
        (123456, "壹仟贰佰叁拾肆元伍角陆分"),
        (100500, "壹仟零伍元整"),
        (10050000, "壹拾万零伍佰元整"),
        (101000, "壹仟零壹拾元整"),
        (1000500, "壹万零伍元整"),
        (101000000, "壹佰零壹万元整"),
        (10000000000, "壹亿元整"),
        (10000100000, "壹亿零壹仟元整"),
        (12000000000, "壹亿贰仟万元整"),
        (99999999999999, "玖仟玖佰玖拾玖亿玖仟玖佰玖拾玖万玖仟玖佰玖拾玖元玖角玖分"),
        (-130863, "负壹仟叁佰零捌元陆角叁分"),
    ],
)
def test_capital_numerals(fen: int, words: str) -> None:
    assert capital_yuan(fen) == words


def test_capital_numerals_bound() -> None:
    with pytest.raises(ValueError, match="10\\^12"):
        capital_yuan(10**12 * 100)


def test_the_shipped_font_covers_gbk_hanzi_and_the_printed_symbols() -> None:
    with TTFont(str(FONT_PATH), lazy=True) as font:
        cmap = font.getBestCmap()
    missing = [hex(c) for c in range(0x4E00, 0x9FA6) if c not in cmap]
    assert not missing, f"{len(missing)} hanzi of GBK missing, first {missing[:5]}"
    for char in "¥—，、。：；（）《》【】①％￥𬭚":
        assert ord(char) in cmap, f"{char!r} (U+{ord(char):04X}) missing from {FONT_PATH.name}"
    assert (FONT_PATH.parent / "OFL.txt").is_file(), "the OFL must ship with the font"


# -- documents -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lang", "words"),
    [
        (
            "zh",
            [
                "账单",
                "不是增值税发票",
                "销售方",
                "购买方",
                "价税合计",
                "第1页/共1页",
                "已开具",
                "产业发展",
                "公共治理",
            ],
        ),
        ("en", ["Invoice", "not a fapiao", "Seller", "Buyer", "Total (incl. VAT)", "Page 1 of 1", "Issued"]),
    ],
)
def test_invoice_holds_what_a_fapiao_is_made_from(lang: str, words: list[str]) -> None:
    pages = _pages(_rendered("invoice", lang))
    assert len(pages) == 1
    _assert_holds(
        pages[0],
        *words,
        "PDG-2026-000017",
        SELLER["name"],
        SELLER["credit_code"],
        SELLER["bank"],
        SELLER["account"],
        BUYER["name"],
        BUYER["credit_code"],
        *(line["dataset_name"] for line in INVOICE["lines"]),
        "3040203000000000000",
        "1,234.56",
        "98,765.00",
        "¥99,999.56",  # subtotal
        "¥5,999.97",  # VAT
        "¥105,999.53",  # total
        "壹拾万伍仟玖佰玖拾玖元伍角叁分",
        "2026-12-0216:00",  # issued, in the billing time zone
        INVOICE["content_hash"],
        INVOICE["signature"],
    )
    assert ("账单" in pages[0]) == (lang == "zh")


@pytest.mark.parametrize("lang", ["zh", "en"])
@pytest.mark.parametrize("kind", ["credit", "debit"])
def test_note_names_its_invoice_parties_and_amounts(kind: str, lang: str) -> None:
    note = _note(kind)
    pages = _pages(_rendered(kind, lang))
    titles = {("credit", "zh"): "贷项通知单", ("debit", "zh"): "借项通知单"}
    titles |= {("credit", "en"): "Credit note", ("debit", "en"): "Debit note"}
    _assert_holds(
        pages[0],
        titles[kind, lang],
        "红字" if kind == "credit" else "补开" if lang == "zh" else "additional",
        note["number"],
        "PDG-2026-000017",
        SELLER["name"],
        SELLER["credit_code"],
        BUYER["name"],
        BUYER["credit_code"],
        note["reason"],
        "企业登记信息",
        "¥1,234.56",
        "¥74.07",
        "¥1,308.63",
        "壹仟叁佰零捌元陆角叁分",
    )
    other = titles["debit" if kind == "credit" else "credit", lang]
    assert other not in pages[0]


def test_an_invoice_as_closing_a_period_stores_it_renders() -> None:
    # The shape billing.invoices writes today: no number, parties or tax codes.
    stored = {
        "format": "pdg.invoice.v1",
        "id": "inv-2026-11-lic-0042",
        "licensee_id": "lic-0042",
        "period": "2026-11",
        "status": "closed",
        "closed_at": "2026-12-01T00:05:00Z",
        "lines": [
            {
                "dataset": "ent-registry",
                "purpose": "industrial",
                "kind": "usage",
                "usage_period": "2026-11",
                "terms_version": 1,
                "calls": 3,
                "records": 3,
                "charge_fen": "4.5000",
                "amount_fen": 5,
                "split": {"provider_fen": 3, "operator_fen": 1, "public_fund_fen": 1},
                "line_no": 1,
            }
        ],
        "subtotal_fen": 5,
        "vat_rate": "0.06",
        "vat_fen": 0,
        "total_fen": 5,
        "content_hash": "0" * 64,
    }
    pdf = invoice_pdf(stored)
    _assert_holds(_pages(pdf)[0], "inv-2026-11-lic-0042", "ent-registry", "已结账", "¥0.05", "伍分", "名称—")
    assert PdfReader(io.BytesIO(pdf)).metadata.creation_date == datetime(2026, 12, 1, 0, 5, tzinfo=UTC)


def test_note_of_a_whole_invoice_and_a_bad_kind() -> None:
    note = {**_note("credit"), "line_no": None}
    _assert_holds(_pages(note_pdf(note))[0], "更正范围整张账单")
    with pytest.raises(ValueError, match="credit or debit"):
        note_pdf({**note, "kind": "refund"})


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_statement_lists_every_entry_and_the_balance(lang: str) -> None:
    pages = _pages(_rendered("statement", lang))
    _assert_holds(
        pages[0],
        "对账单" if lang == "zh" else "Statement of account",
        BUYER["name"],
        BUYER["credit_code"],
        "lic-0042",
        "2026-01",
        "2026-11",
        "PDG-2026-000017¥105,999.53¥105,999.53",
        "PDG-CN-2026-000003-¥1,308.63¥104,690.90",
        "BANK-20261212-01-¥104,690.90¥0.00",
    )
    assert pages[0].endswith("第1页/共1页" if lang == "zh" else "Page1of1")


def test_a_long_invoice_runs_over_pages_with_every_line() -> None:
    lines = [_line(n, f"第{n:03d}号数据集", f"ds-{n:03d}", 1000 + n) for n in range(1, 121)]
    invoice = _invoice(lines)
    pages = _pages(invoice_pdf(invoice))
    assert len(pages) >= 3
    text = "".join(pages)
    for n in range(1, 121):
        assert text.count(f"第{n:03d}号数据集") == 1, f"line {n} not printed exactly once"
    for number, page in enumerate(pages, 1):
        assert f"第{number}页/共{len(pages)}页" in page, f"page {number} has no page number"
        # The lines table's heading row repeats on every page the table runs over.
        assert "序号数据集用途" in page or number == len(pages)
    _assert_holds(pages[-1], cny(invoice["total_fen"]), capital_yuan(invoice["total_fen"]))


def test_the_font_is_embedded_as_a_subset() -> None:
    pdf = _rendered("invoice", "zh")
    # The whole font is 7 MB; a page of an invoice carries only the glyphs it uses.
    assert len(pdf) < 100_000, f"{len(pdf)} bytes: the font was not subset"
    fonts = PdfReader(io.BytesIO(pdf)).pages[0]["/Resources"]["/Font"]
    assert fonts, "no font on the page"
    for font in fonts.values():
        font = font.get_object()
        descendant = font["/DescendantFonts"][0].get_object()
        assert "/FontFile2" in descendant["/FontDescriptor"], f"{font['/BaseFont']} is not embedded"
        assert re.fullmatch(r"/[A-Z]{6}\+\S+", font["/BaseFont"]), f"{font['/BaseFont']} is not a subset"
        assert "/ToUnicode" in font


def test_the_same_document_gives_the_same_bytes() -> None:
    first = _rendered("invoice", "zh")
    assert invoice_pdf(dict(INVOICE)) == first
    assert note_pdf(_note("debit"), lang="en") == _rendered("debit", "en")
    assert statement_pdf(STATEMENT) == _rendered("statement", "zh")
    changed = _invoice([{**INVOICE["lines"][0], "amount_fen": 123457}, *INVOICE["lines"][1:]])
    assert invoice_pdf(changed) != first
    # The creation date is the document's, not the clock's.
    assert PdfReader(io.BytesIO(first)).metadata.creation_date == datetime(2026, 12, 2, 8, tzinfo=UTC)


@pytest.mark.parametrize(
    "render",
    [
        lambda lang: invoice_pdf(INVOICE, lang=lang),
        lambda lang: note_pdf(_note("credit"), lang=lang),
        lambda lang: statement_pdf(STATEMENT, lang=lang),
    ],
    ids=["invoice", "note", "statement"],
)
@pytest.mark.parametrize("lang", ["fr", "ZH", "", "zh-CN"])
def test_an_unknown_language_is_refused(render: Any, lang: str) -> None:
    with pytest.raises(ValueError, match="lang is one of zh, en"):
        render(lang)


def test_bad_time_zone_and_float_money_are_refused() -> None:
    with pytest.raises(ValueError, match="time zone"):
        invoice_pdf(INVOICE, time_zone="Mars/Olympus")
    with pytest.raises(TypeError, match="total_fen"):
        invoice_pdf({**INVOICE, "total_fen": 1059.99})
    with pytest.raises(TypeError, match="line 2's amount_fen"):
        invoice_pdf(_invoice([INVOICE["lines"][0]]) | {"lines": [INVOICE["lines"][0], {"amount_fen": 1.0}]})
