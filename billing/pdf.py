# Chinese text takes full-width commas, colons and brackets.
# ruff: noqa: RUF001
"""Billing documents as PDF: invoices, credit and debit notes, statements.

:func:`invoice_pdf`, :func:`note_pdf` and :func:`statement_pdf` take the
document as a plain dict (extra keys are ignored, absent optional fields show
as ``—``) and return the bytes of an A4 PDF, in Chinese (``lang="zh"``, the
default) or with English labels (``"en"``); any other ``lang`` is a
ValueError. Data is printed as given: names, addresses and reasons in the
language they were written in.

**What a document says it is.** An invoice is titled 账单 (not 发票: only the
tax system issues a 增值税发票) and states that it is the basis for a VAT
fapiao, not a fapiao; a credit note (贷项通知单) is the basis for a red-letter
fapiao, a debit note (借项通知单) for an additional one; a statement (对账单) is
for reconciling accounts only. Every page carries its document's number (a
statement's: the licensee and the months covered) and "page n of N"; the
lines table repeats its heading row on each page; the content hash and
signature are printed in full, in small type.

**Money** is integer fen (a ``float``, ``bool`` or ``str`` amount is a
TypeError): ``¥1,234.56`` (:func:`cny`), columns headed 元 carry
``1,234.56`` (:func:`yuan`), and an invoice's or note's total is also written
in capital numerals (:func:`capital_yuan`, 壹仟贰佰叁拾肆元伍角陆分) as a fapiao
requires. VAT rates are decimal strings (``"0.06"``), shown as ``6%``.
Timestamps (RFC 3339) are shown in ``time_zone`` (the billing time zone,
``Asia/Shanghai`` unless told), dates and periods as given.

**Deterministic.** The same document, language, time zone and library
versions give the same bytes, so a PDF can be hashed: the PDF's creation date
is the document's own (``issued_at``, else ``closed_at``, for a statement
``generated_at``; 1970-01-01 when it has none), the file identifier is derived
from the content, nothing random is written.

**Library and font.** fpdf2 (pure Python, wheels only; it brings fontTools,
Pillow and defusedxml): it embeds a subset of a TrueType font holding only
the glyphs used, as ``CIDFontType2`` with ``Identity-H`` encoding and a
``ToUnicode`` map, so any reader shows the Chinese and pypdf or pdfminer give
the text back. reportlab was set aside because its ready CJK font
(STSong-Light) is never embedded, WeasyPrint for its system libraries.
The font is shipped in ``billing/fonts/``: Noto Sans CJK SC Regular
(SIL Open Font License 1.1), cut by ``billing/fonts/build_font.py`` to
Latin, punctuation, the CJK Unified Ideographs block (all of GBK's hanzi)
and all 8,105 characters of the 通用规范汉字表, and converted to TrueType
outlines (fpdf2's path for CFF-outline fonts writes an encoding that pypdf
and pdfminer cannot read). That is 7.2 MB on disk, and tens of kB in a
document. Shipping it keeps rendering offline, independent of the system's
fonts, and byte-identical from one machine to another. A character outside
the font is drawn as an empty box (fpdf2 logs which).

Rendering takes tenths of a second of CPU: from a coroutine, call these
functions in an executor (``loop.run_in_executor``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fpdf import FPDF
from fpdf.fonts import FontFace

from core.money import parse_vat_rate

#: The shipped font (see the module docstring and ``billing/fonts/README.md``).
FONT_PATH: Final = Path(__file__).with_name("fonts") / "NotoSansCJKsc-Regular-subset.ttf"
LANGS: Final = ("zh", "en")
#: The PDF creation date of a document that carries no timestamp.
NO_DATE: Final = datetime(1970, 1, 1, tzinfo=UTC)
_FONT: Final = "cjk"
_BLANK: Final = "—"
_GREY: Final = (90, 90, 90)
_HEADING = FontFace(emphasis="", fill_color=(232, 236, 242))
_SYMBOLS: Final = {"CNY": "¥"}


@dataclass(frozen=True)
class _Words:
    """Every fixed text of the documents in one language."""

    invoice: str
    invoice_basis: str
    credit_note: str
    credit_basis: str
    debit_note: str
    debit_basis: str
    statement: str
    statement_basis: str
    number: str
    document_id: str
    period: str
    status: str
    issued_at: str
    due_at: str
    currency: str
    customer_id: str
    seller: str
    buyer: str
    licensee: str
    name: str
    credit_code: str
    address: str
    bank: str
    account: str
    line_columns: tuple[str, ...]
    subtotal: str
    vat_at: str
    total: str
    in_words: str
    content_hash: str
    signature: str
    page: str
    invoice_number: str
    reason: str
    scope: str
    whole_invoice: str
    line: str
    aside: str
    separator: str
    amount: str
    amount_in: str
    yuan: str
    range: str
    through: str
    generated_at: str
    entry_columns: tuple[str, ...]
    opening_balance: str
    closing_balance: str
    colon: str
    purposes: Mapping[str, str] = field(default_factory=dict)
    kinds: Mapping[str, str] = field(default_factory=dict)
    statuses: Mapping[str, str] = field(default_factory=dict)
    entries: Mapping[str, str] = field(default_factory=dict)


_ZH = _Words(
    invoice="账单",
    invoice_basis="本账单是开具增值税发票的依据，其本身不是增值税发票。",
    credit_note="贷项通知单",
    credit_basis="本通知单是开具红字增值税发票的依据，其本身不是增值税发票。",
    debit_note="借项通知单",
    debit_basis="本通知单是补开增值税发票的依据，其本身不是增值税发票。",
    statement="对账单",
    statement_basis="本对账单仅供核对账目，不是发票。",
    number="编号",
    document_id="单据标识",
    period="账期",
    status="状态",
    issued_at="开具时间",
    due_at="付款期限",
    currency="币种",
    customer_id="客户编号",
    seller="销售方",
    buyer="购买方",
    licensee="客户",
    name="名称",
    credit_code="统一社会信用代码",
    address="地址、电话",
    bank="开户行",
    account="账号",
    line_columns=("序号", "数据集", "用途", "类别", "用量期间", "调用次数", "记录数", "税收分类编码", "税率"),
    subtotal="金额合计（不含税）",
    vat_at="税额（税率 {rate}）",
    total="价税合计",
    in_words="价税合计（大写）",
    content_hash="内容摘要（SHA-256）",
    signature="签名",
    page="第 {page} 页 / 共 {pages} 页",
    invoice_number="原账单编号",
    reason="原因",
    scope="更正范围",
    whole_invoice="整张账单",
    line="第 {line} 行",
    aside="（{}）",
    separator="，",
    amount="金额",
    amount_in="金额（{unit}）",
    yuan="元",
    range="对账期间",
    through="{start} 至 {end}",
    generated_at="生成时间",
    entry_columns=("日期", "类别", "单据编号", "金额", "余额"),
    opening_balance="期初余额",
    closing_balance="期末余额",
    colon="：",
    purposes={"industrial": "产业发展", "public-interest": "公共治理、公益事业"},
    kinds={"usage": "用量", "late": "补记用量", "prepaid": "预付", "top-up": "充值"},
    statuses={
        "draft": "草稿",
        "closed": "已结账",
        "issued": "已开具",
        "paid": "已付清",
        "overdue": "逾期",
        "void": "已作废",
        "voided": "已作废",
    },
    entries={"invoice": "账单", "credit-note": "贷项通知单", "debit-note": "借项通知单", "payment": "收款"},
)
_EN = _Words(
    invoice="Invoice",
    invoice_basis="The basis for a VAT fapiao (增值税发票); this document is not a fapiao.",
    credit_note="Credit note",
    credit_basis="The basis for a red-letter VAT fapiao (红字发票); this document is not a fapiao.",
    debit_note="Debit note",
    debit_basis="The basis for an additional VAT fapiao; this document is not a fapiao.",
    statement="Statement of account",
    statement_basis="For reconciling accounts only; this document is not a fapiao.",
    number="Number",
    document_id="Document id",
    period="Period",
    status="Status",
    issued_at="Issued",
    due_at="Due",
    currency="Currency",
    customer_id="Customer id",
    seller="Seller",
    buyer="Buyer",
    licensee="Customer",
    name="Name",
    credit_code="Unified social credit code",
    address="Address, telephone",
    bank="Bank",
    account="Account",
    line_columns=("No.", "Dataset", "Purpose", "Kind", "Usage period", "Calls", "Records", "Tax code", "VAT"),
    subtotal="Subtotal (excl. VAT)",
    vat_at="VAT at {rate}",
    total="Total (incl. VAT)",
    in_words="Total in words (大写)",
    content_hash="Content hash (SHA-256)",
    signature="Signature",
    page="Page {page} of {pages}",
    invoice_number="Invoice",
    reason="Reason",
    scope="Corrects",
    whole_invoice="the whole invoice",
    line="line {line}",
    aside=" ({})",
    separator=", ",
    amount="Amount",
    amount_in="Amount ({unit})",
    yuan="CNY",
    range="Period covered",
    through="{start} to {end}",
    generated_at="Generated",
    entry_columns=("Date", "Kind", "Document", "Amount", "Balance"),
    opening_balance="Opening balance",
    closing_balance="Closing balance",
    colon=": ",
    purposes={"industrial": "Industrial", "public-interest": "Public interest"},
    kinds={"usage": "Usage", "late": "Late usage", "prepaid": "Prepaid", "top-up": "Top-up"},
    statuses={
        "draft": "Draft",
        "closed": "Closed",
        "issued": "Issued",
        "paid": "Paid",
        "overdue": "Overdue",
        "void": "Void",
        "voided": "Void",
    },
    entries={
        "invoice": "Invoice",
        "credit-note": "Credit note",
        "debit-note": "Debit note",
        "payment": "Payment",
    },
)
_WORDS: Final = {"zh": _ZH, "en": _EN}


# -- money ----------------------------------------------------------------------


def _fen(value: Any, what: str) -> int:
    # No float ever holds money (core.money); bool is an int subclass, refuse it too.
    if value.__class__ is not int:
        raise TypeError(f"{what} must be an int of fen, got {value!r}")
    return int(value)


def yuan(amount_fen: int) -> str:
    """Integer fen as yuan with thousands separators: 123456 -> ``"1,234.56"``,
    -5 -> ``"-0.05"``."""
    amount = _fen(amount_fen, "an amount")
    sign = "-" if amount < 0 else ""
    whole, cents = divmod(abs(amount), 100)
    return f"{sign}{whole:,}.{cents:02d}"


def cny(amount_fen: int, currency: str = "CNY") -> str:
    """Integer fen with its currency's sign: 123456 -> ``"¥1,234.56"``,
    -123456 -> ``"-¥1,234.56"``; a currency without a sign is prefixed by
    its code (``"USD 1,234.56"``)."""
    text = yuan(amount_fen)
    sign, digits = ("-", text[1:]) if text.startswith("-") else ("", text)
    symbol = _SYMBOLS.get(currency, f"{currency} ")
    return f"{sign}{symbol}{digits}"


_DIGITS: Final = "零壹贰叁肆伍陆柒捌玖"
_PLACES: Final = ("", "拾", "佰", "仟")
_GROUPS: Final = ("", "万", "亿")


def capital_yuan(amount_fen: int) -> str:
    """Integer fen in capital numerals, as written on a fapiao (大写金额):
    123456 -> ``"壹仟贰佰叁拾肆元伍角陆分"``, 100500 -> ``"壹仟零伍元整"``,
    10_000_005_00 -> ``"壹仟万零伍元整"``; a negative amount is prefixed by 负.
    One 零 stands for a run of zeros inside the amount (not for zeros that
    only end a group: 10,700,053 fen is 壹拾万柒仟元零伍角叁分, one of the forms
    the rules for bills give), and for a zero yuan digit before 角 or a zero
    角 before 分; 壹拾 is written in full; nothing follows 角 (整 only closes
    whole yuan). ValueError from 10^12 yuan."""
    amount = _fen(amount_fen, "an amount")
    if amount < 0:
        return "负" + capital_yuan(-amount)
    whole, cents = divmod(amount, 100)
    jiao, fen = divmod(cents, 10)
    if whole >= 10**12:
        raise ValueError(f"an amount in capital numerals is below 10^12 yuan, got {amount_fen} fen")
    digits = str(whole)
    parts: list[str] = []
    zero = False
    group_used = False
    for index, char in enumerate(digits):
        place = len(digits) - 1 - index
        digit = int(char)
        if digit == 0:
            zero = bool(parts)
        else:
            if zero:
                parts.append("零")
                zero = False
            parts.append(_DIGITS[digit] + _PLACES[place % 4])
            group_used = True
        if place % 4 == 0 and place > 0 and group_used:
            # Zeros that only end a group are not read: 105,000 is 壹拾万伍仟.
            parts.append(_GROUPS[place // 4])
            group_used = zero = False
    text = "".join(parts)
    if text:
        text += "元"
    if jiao == 0 and fen == 0:
        return (text or "零元") + "整"
    if text and (jiao == 0 or whole % 10 == 0):
        # The rules' own examples: 1,680.32 is 壹仟陆佰捌拾元零叁角贰分.
        text += "零"
    if jiao:
        text += _DIGITS[jiao] + "角"
    if fen:
        text += _DIGITS[fen] + "分"
    return text


def _rate(value: Any) -> str:
    if value is None:
        return _BLANK
    percent = (parse_vat_rate(str(value)) * 100).normalize()
    return f"{percent:f}%"


# -- text of values ---------------------------------------------------------------


def _text(value: Any) -> str:
    if value is None or value == "":
        return _BLANK
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str) or "T" not in value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def _when(value: Any, zone: ZoneInfo) -> str:
    moment = _timestamp(value)
    if moment is None:
        return _text(value)
    local = moment.astimezone(zone)
    offset = local.strftime("%z")
    return f"{local:%Y-%m-%d %H:%M} UTC{offset[:3]}:{offset[3:]}"


def _creation_date(*candidates: Any) -> datetime:
    for value in candidates:
        moment = _timestamp(value)
        if moment is not None:
            return moment.astimezone(UTC)
    return NO_DATE


def _words(lang: str) -> _Words:
    try:
        return _WORDS[lang]
    except (KeyError, TypeError):
        raise ValueError(f"lang is one of {', '.join(LANGS)}, got {lang!r}") from None


def _zone(time_zone: str) -> ZoneInfo:
    try:
        return ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {time_zone!r}") from None


def _party(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


# -- the page ---------------------------------------------------------------------


class _Document(FPDF):
    """An A4 page in the shipped font, its footer naming the document and page."""

    def __init__(self, words: _Words, lang: str, footer: str, created: datetime) -> None:
        super().__init__(orientation="P", unit="mm", format="A4")
        if not FONT_PATH.is_file():
            raise FileNotFoundError(f"the billing font is missing: {FONT_PATH} (package data not installed)")
        self.words = words
        self.footer_text = footer
        self.set_margins(12, 14, 12)
        self.set_auto_page_break(True, margin=16)
        self.add_font(_FONT, "", str(FONT_PATH))
        self.set_font(_FONT, size=9)
        self.set_creation_date(created)
        self.set_producer("pdg")
        self.set_creator("pdg billing")
        self.set_lang("zh-CN" if lang == "zh" else "en")
        self.alias_nb_pages("{nb}")
        self.add_page()

    def footer(self) -> None:
        self.set_y(-11)
        self.set_font(_FONT, size=7)
        self.set_text_color(*_GREY)
        self.cell(self.epw / 2, 4, self.footer_text)
        page = self.words.page.format(page=self.page_no(), pages="{nb}")
        self.cell(self.epw / 2, 4, page, align="R")
        self.set_text_color(0)

    def heading(self, title: str, basis: str, right: str) -> None:
        """The title, ``right`` (the document's number) beside it, and what
        the document is for."""
        self.set_font(_FONT, size=17)
        self.cell(self.epw / 2, 9, title)
        self.set_font(_FONT, size=10)
        self.cell(self.epw / 2, 9, right, align="R", new_x="LMARGIN", new_y="NEXT")
        self.set_font(_FONT, size=8)
        self.set_text_color(*_GREY)
        self.multi_cell(0, 4.5, basis, new_x="LMARGIN", new_y="NEXT")
        self.set_text_color(0)
        self.ln(2)

    def pairs(self, pairs: Sequence[tuple[str, str]], columns: int = 2) -> None:
        """Labels and values, ``columns`` (2 or 3) pairs a row, in a borderless grid."""
        self.set_font(_FONT, size=8.5)
        widths = (16, 46) * 3 if columns == 3 else (24, 69) * 2
        with self.table(
            col_widths=widths,
            first_row_as_headings=False,
            borders_layout="NONE",
            text_align="LEFT",
            line_height=4.6,
            padding=(0.6, 1),
        ) as table:
            for start in range(0, len(pairs), columns):
                row = table.row()
                for label, value in pairs[start : start + columns]:
                    row.cell(label, style=FontFace(color=_GREY))
                    row.cell(value)
                for _ in range(columns - len(pairs[start : start + columns])):
                    row.cell("")
                    row.cell("")
        self.ln(2)

    def parties(self, left: tuple[str, Mapping[str, Any]], right: tuple[str, Mapping[str, Any]]) -> None:
        """Two parties side by side: name, credit code, address, bank, account."""
        words = self.words
        fields = (
            (words.name, "name"),
            (words.credit_code, "credit_code"),
            (words.address, "address"),
            (words.bank, "bank"),
            (words.account, "account"),
        )
        self.set_font(_FONT, size=8.5)
        with self.table(
            col_widths=(28, 65, 28, 65),
            headings_style=_HEADING,
            text_align="LEFT",
            line_height=4.6,
            padding=(0.8, 1.2),
            borders_layout="HORIZONTAL_LINES",
        ) as table:
            heading = table.row()
            heading.cell(left[0], colspan=2)
            heading.cell(right[0], colspan=2)
            for label, key in fields:
                row = table.row()
                row.cell(label, style=FontFace(color=_GREY))
                row.cell(_text(left[1].get(key)))
                row.cell(label, style=FontFace(color=_GREY))
                row.cell(_text(right[1].get(key)))
        self.ln(3)

    def grid(
        self,
        columns: Sequence[str],
        widths: Sequence[float],
        aligns: Sequence[str],
        rows: Sequence[Sequence[str]],
    ) -> None:
        """A table whose heading row repeats on every page it runs over."""
        self.set_font(_FONT, size=7.5)
        with self.table(
            col_widths=tuple(widths),
            headings_style=_HEADING,
            text_align=tuple(aligns),
            line_height=3.9,
            padding=(0.8, 1),
            borders_layout="SINGLE_TOP_LINE",
            repeat_headings=1,
        ) as table:
            table.row(columns)
            for cells in rows:
                table.row(cells)
        self.ln(2)

    def keep(self, height: float) -> None:
        """Start a new page unless ``height`` mm still fit on this one (so
        totals and their capital numerals stay together)."""
        if self.y + height > self.page_break_trigger:
            self.add_page()

    def sums(self, rows: Sequence[tuple[str, str]]) -> None:
        """Right-aligned totals, the last one larger."""
        for index, (label, value) in enumerate(rows):
            last = index == len(rows) - 1
            self.set_font(_FONT, size=10.5 if last else 9)
            self.set_x(self.l_margin + self.epw - 110)
            self.cell(60, 6, label, align="R")
            self.multi_cell(50, 6, value, align="R", new_x="LMARGIN", new_y="NEXT")
        self.ln(1)

    def labelled(self, label: str, text: str) -> None:
        """A label and a text that wraps over the full width."""
        self.set_font(_FONT, size=9)
        self.multi_cell(0, 5.5, f"{label}{self.words.colon}{text}", new_x="LMARGIN", new_y="NEXT")
        self.ln(1.5)

    def integrity(self, document: Mapping[str, Any]) -> None:
        """The content hash and the signature, in full, in small type."""
        self.set_font(_FONT, size=6.5)
        self.set_text_color(*_GREY)
        for label, key in ((self.words.content_hash, "content_hash"), (self.words.signature, "signature")):
            if document.get(key):
                text = f"{label}{self.words.colon}{document[key]}"
                self.multi_cell(0, 3.2, text, new_x="LMARGIN", new_y="NEXT")
        self.set_text_color(0)

    def render(self) -> bytes:
        return bytes(self.output())

    def close_fonts(self) -> None:
        """Close the font files fontTools keeps open (``output`` closes them
        too, but not a document that failed before it)."""
        for font in self.fonts.values():
            close = getattr(font, "close", None)
            if close is not None:
                close()


# -- the documents -----------------------------------------------------------------


def _label(mapping: Mapping[str, str], value: Any) -> str:
    return mapping.get(value, _text(value)) if isinstance(value, str) else _text(value)


def _document_number(document: Mapping[str, Any]) -> str:
    return _text(document.get("number") or document.get("id"))


def invoice_pdf(invoice: Mapping[str, Any], *, lang: str = "zh", time_zone: str = "Asia/Shanghai") -> bytes:
    """The invoice as a PDF: title and basis note, period and dates, seller
    and buyer, a row per line (every line, over as many pages as needed),
    subtotal, VAT, total in figures and in capital numerals, content hash
    and signature."""
    words, zone = _words(lang), _zone(time_zone)
    currency = _text(invoice.get("currency") or "CNY")
    number = _document_number(invoice)
    issued = invoice.get("issued_at") or invoice.get("closed_at")
    pdf = _Document(words, lang, number, _creation_date(issued))
    try:
        pdf.set_title(f"{words.invoice} {number}")
        pdf.heading(words.invoice, words.invoice_basis, f"{words.number}  {number}")
        pdf.pairs(
            [
                (words.period, _text(invoice.get("period"))),
                (words.status, _label(words.statuses, invoice.get("status"))),
                (words.issued_at, _when(issued, zone)),
                (words.due_at, _when(invoice.get("due_at"), zone)),
                (words.currency, currency),
                (words.document_id, _text(invoice.get("id"))),
            ],
            columns=3,
        )
        pdf.parties(
            (words.seller, _party(invoice.get("seller"))), (words.buyer, _party(invoice.get("buyer")))
        )
        rows = []
        for position, line in enumerate(invoice.get("lines") or (), 1):
            dataset = _text(line.get("dataset"))
            name = line.get("dataset_name")
            rows.append(
                (
                    _text(line.get("line_no", position)),
                    f"{name}\n{dataset}" if name else dataset,
                    _label(words.purposes, line.get("purpose")),
                    _label(words.kinds, line.get("kind")),
                    _text(line.get("usage_period")),
                    _text(line.get("calls")),
                    _text(line.get("records")),
                    _text(line.get("tax_code")),
                    _rate(line.get("vat_rate", invoice.get("vat_rate"))),
                    yuan(_fen(line.get("amount_fen"), f"line {position}'s amount_fen")),
                )
            )
        pdf.grid(
            (*words.line_columns, words.amount_in.format(unit=words.yuan if currency == "CNY" else currency)),
            (8, 38, 17, 13, 15, 16, 16, 31, 9, 23),
            ("C", "L", "L", "L", "C", "R", "R", "L", "R", "R"),
            rows,
        )
        total = _fen(invoice.get("total_fen"), "total_fen")
        pdf.keep(28)
        groups = invoice.get("vat_groups") or [
            {"vat_rate": invoice.get("vat_rate"), "vat_fen": invoice.get("vat_fen")}
        ]
        pdf.sums(
            [
                (words.subtotal, cny(_fen(invoice.get("subtotal_fen"), "subtotal_fen"), currency)),
                *(
                    (
                        words.vat_at.format(rate=_rate(group.get("vat_rate"))),
                        cny(_fen(group.get("vat_fen"), "vat_fen"), currency),
                    )
                    for group in groups
                ),
                (words.total, cny(total, currency)),
            ]
        )
        if currency == "CNY":
            pdf.labelled(words.in_words, capital_yuan(total))
        pdf.integrity(invoice)
        return pdf.render()
    finally:
        pdf.close_fonts()


def note_pdf(note: Mapping[str, Any], *, lang: str = "zh", time_zone: str = "Asia/Shanghai") -> bytes:
    """A credit or debit note as a PDF: title and basis note, the invoice it
    corrects and what of it (the whole invoice or one line), the reason,
    seller and buyer, amount, VAT and total in figures and in capital
    numerals, content hash and signature. ValueError for a ``kind`` other
    than ``credit`` or ``debit``."""
    words, zone = _words(lang), _zone(time_zone)
    kind = note.get("kind")
    if kind not in ("credit", "debit"):
        raise ValueError(f"a note's kind is credit or debit, got {kind!r}")
    title, basis = (
        (words.credit_note, words.credit_basis) if kind == "credit" else (words.debit_note, words.debit_basis)
    )
    currency = _text(note.get("currency") or "CNY")
    number = _document_number(note)
    pdf = _Document(words, lang, number, _creation_date(note.get("issued_at")))
    try:
        pdf.set_title(f"{title} {number}")
        pdf.heading(title, basis, f"{words.number}  {number}")
        line_no = note.get("line_no")
        if line_no is None:
            scope = words.whole_invoice
        else:
            named = [str(v) for v in (note.get("dataset_name"), note.get("dataset")) if v]
            if note.get("purpose"):
                named.append(_label(words.purposes, note["purpose"]))
            scope = words.line.format(line=line_no)
            if named:
                scope += words.aside.format(words.separator.join(named))
        pdf.pairs(
            [
                (words.invoice_number, _text(note.get("invoice_number") or note.get("invoice_id"))),
                (words.issued_at, _when(note.get("issued_at"), zone)),
                (words.scope, scope),
                (words.currency, currency),
                (words.document_id, _text(note.get("id"))),
                (words.period, _text(note.get("period"))),
            ]
        )
        pdf.parties((words.seller, _party(note.get("seller"))), (words.buyer, _party(note.get("buyer"))))
        pdf.labelled(words.reason, _text(note.get("reason")))
        total = _fen(note.get("total_fen"), "total_fen")
        pdf.keep(28)
        pdf.sums(
            [
                (words.subtotal, cny(_fen(note.get("amount_fen"), "amount_fen"), currency)),
                (
                    words.vat_at.format(rate=_rate(note.get("vat_rate"))),
                    cny(_fen(note.get("vat_fen"), "vat_fen"), currency),
                ),
                (words.total, cny(total, currency)),
            ]
        )
        if currency == "CNY":
            pdf.labelled(words.in_words, capital_yuan(total))
        pdf.integrity(note)
        return pdf.render()
    finally:
        pdf.close_fonts()


def statement_pdf(
    statement: Mapping[str, Any], *, lang: str = "zh", time_zone: str = "Asia/Shanghai"
) -> bytes:
    """A licensee's statement as a PDF: the licensee, the months covered, a
    row per entry (date, kind, document number, signed amount, running
    balance) over as many pages as needed, the closing balance, content hash
    and signature when present."""
    words, zone = _words(lang), _zone(time_zone)
    currency = _text(statement.get("currency") or "CNY")
    licensee = _party(statement.get("licensee"))
    covered = words.through.format(start=_text(statement.get("from")), end=_text(statement.get("to")))
    name = _text(licensee.get("name"))
    pdf = _Document(words, lang, f"{name}  {covered}", _creation_date(statement.get("generated_at")))
    try:
        pdf.set_title(f"{words.statement} {name} {covered}")
        pdf.heading(words.statement, words.statement_basis, covered)
        pdf.pairs(
            [
                (words.licensee, name),
                (words.credit_code, _text(licensee.get("credit_code"))),
                (words.customer_id, _text(licensee.get("id"))),
                (words.range, covered),
                (words.generated_at, _when(statement.get("generated_at"), zone)),
                (words.currency, currency),
            ]
        )
        seller = _party(statement.get("seller"))
        if seller:
            pdf.labelled(words.seller, f"{_text(seller.get('name'))}  {_text(seller.get('credit_code'))}")

        def money(value: Any, what: str) -> str:
            return cny(_fen(value, what), currency)

        rows = [
            (
                _when(entry.get("date"), zone),
                _label(words.entries, entry.get("kind")),
                _text(entry.get("number")),
                money(entry.get("amount_fen"), f"entry {position}'s amount_fen"),
                money(entry.get("balance_fen"), f"entry {position}'s balance_fen"),
            )
            for position, entry in enumerate(statement.get("entries") or (), 1)
        ]
        if "opening_balance_fen" in statement:
            pdf.sums(
                [(words.opening_balance, money(statement["opening_balance_fen"], "opening_balance_fen"))]
            )
        pdf.grid(words.entry_columns, (30, 30, 56, 35, 35), ("L", "L", "L", "R", "R"), rows)
        pdf.sums([(words.closing_balance, money(statement.get("balance_fen"), "balance_fen"))])
        pdf.integrity(statement)
        return pdf.render()
    finally:
        pdf.close_fonts()
