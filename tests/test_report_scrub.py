"""Report scrubbing: every shape a reviewer showed missed or wrongly scrubbed, and medical text that must survive."""
from collections import Counter

import pytest

from mmdomain.report_scrub import Scrubber


@pytest.mark.parametrize("text, gone, kinds, kept", [
    # missed before: accession numbers with "#", dd-Mon-yyyy dates, "seen by" names, DICOM person names
    ("Acc# 99881 chest film", ["99881"], {"id": 1}, ["Acc#", "chest film"]),
    ("Acc #: 12345. CT head", ["12345"], {"id": 1}, ["Acc #:", "CT head"]),
    ("Study on 12-Mar-2024, stable.", ["12-Mar-2024"], {"date": 1}, ["Study on", "stable"]),
    ("Study on 12-MAR-2024, stable.", ["12-MAR-2024"], {"date": 1}, ["Study on", "stable"]),
    ("Compared with 12 Mar 24.", ["12 Mar 24"], {"date": 1}, ["Compared with"]),
    ("Patient seen by SMITH, John in clinic.", ["SMITH", "John"], {"name": 1}, ["seen by", "in clinic"]),
    ("Seen by John Smith. No acute findings.", ["John", "Smith"], {"name": 1}, ["Seen by", "No acute findings"]),
    ("Examined by Jane Roe, reviewed by ROE, Jane; referred by Doe, John; ordered by Al Lee.",
     ["Jane", "Roe", "ROE", "Doe", "John", "Al", "Lee"], {"name": 4}, ["Examined by", "reviewed by", "ordered by"]),
    ("Patient DOE^JANE, T2 hyperintense lesion.", ["DOE", "JANE"], {"name": 1}, ["T2 hyperintense lesion"]),
    ("Name: Doe^Jane^^Dr. L4-L5 disc bulge.", ["Doe", "Jane", "^"], {"name": 1}, ["L4-L5 disc bulge"]),
    # wrong before: the ID after "Patient ID" is an ID, and "ID" is never a name
    ("Patient ID: AB-12345. Chest CT.", ["AB-12345", "12345"], {"id": 1}, ["Patient ID: [ID]", "Chest CT"]),
    ("Patient ID: A12345", ["A12345"], {"id": 1}, ["Patient ID: [ID]"]),
    ("MRN: 12-3456-7, C5 fracture", ["12-3456-7"], {"id": 1}, ["C5 fracture"]),
    # an allow-listed eponym after a title is a person
    ("Reading: Dr. Parkinson. Parkinson disease.", ["Dr. Parkinson"], {"name": 1}, ["Dr. [NAME]", "Parkinson disease"]),
    # false positives before: headings and clinical words after "patient" are no name
    ("Patient Crohn's Disease, terminal ileum 3.2 cm.", [], {}, ["Patient Crohn's Disease", "3.2 cm"]),
    ("Patient Non-Hodgkin Lymphoma restaging.", [], {}, ["Patient Non-Hodgkin Lymphoma"]),
    ("Pt Status post ORIF at 10:30.", [], {}, ["Pt Status post ORIF", "10:30"]),
    ("PATIENT HISTORY: Parkinson, Hodgkin.", [], {}, ["PATIENT HISTORY: Parkinson, Hodgkin."]),
    ("Patient: Male, 67 years", [], {}, ["Patient: Male, 67 years"]),
    ("Patient: Female. Patient Age 54. Patient Information: none.", [], {},
     ["Patient: Female", "Patient Age 54", "Patient Information"]),
    # a name in prose still goes, and the clause after it stays
    ("Patient Jane Doe Presents with pain.", ["Jane", "Doe"], {"name": 1}, ["Presents with pain"]),
])
def test_scrubber_removes_identifiers_and_keeps_medical_text(text, gone, kinds, kept):
    clean, counts = Scrubber().scrub(text)
    for secret in gone:
        assert secret not in clean, (secret, clean)
    for part in kept:
        assert part in clean, (part, clean)
    assert counts == Counter(kinds), clean
