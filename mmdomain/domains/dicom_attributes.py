"""Which DICOM attributes describe pixels: the allow-list that reaches shards, and the attributes of one frame.

Enhanced multi-frame objects (Enhanced CT/MR/...) keep rescale, window and geometry inside functional groups:
``PerFrameFunctionalGroupsSequence`` (one item per frame) and ``SharedFunctionalGroupsSequence`` (one item for all).
pydicom 3's ``apply_modality_lut`` / ``apply_voi_lut`` read top-level attributes only (pydicom issue #2353), so
``frame_view`` lifts the values of one frame to the top level of a small dataset those functions can read.
"""
from __future__ import annotations

from typing import Any

# Top-level attributes a decoder needs and that identify nobody. Everything else is dropped from shards.
PIXEL_KEYWORDS = (
    "SOPClassUID", "Modality", "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation", "PlanarConfiguration", "NumberOfFrames", "PixelSpacing",
    "SliceThickness", "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence", "WindowCenter",
    "WindowWidth", "VOILUTFunction", "VOILUTSequence", "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor", "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData", "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData", "SegmentedBluePaletteColorLookupTableData", "PixelPaddingValue",
    "ImagePositionPatient", "ImageOrientationPatient", "PerFrameFunctionalGroupsSequence",
    "SharedFunctionalGroupsSequence", "PixelData", "FloatPixelData", "DoubleFloatPixelData",
)

# The functional groups that describe pixels, each with the attributes of its item that may travel. Others (Frame
# Content, Cardiac Synchronization, ...) hold acquisition datetimes and references, so they never reach shards.
FRAME_GROUPS: dict[str, tuple[str, ...]] = {
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence"),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"),
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
}

# Every sequence that may travel, with what its items may keep (free-text explanations such as LUTExplanation stay out).
ITEM_KEYWORDS: dict[str, tuple[str, ...]] = {
    "ModalityLUTSequence": ("LUTDescriptor", "ModalityLUTType", "LUTData"),
    "VOILUTSequence": ("LUTDescriptor", "LUTData"),
    "PerFrameFunctionalGroupsSequence": tuple(FRAME_GROUPS),
    "SharedFunctionalGroupsSequence": tuple(FRAME_GROUPS),
    **FRAME_GROUPS,
}

# What the greyscale display chain (modality LUT, VOI LUT, photometric) reads for one frame.
DISPLAY_KEYWORDS = (
    "PhotometricInterpretation", "BitsStored", "PixelRepresentation", "ModalityLUTSequence", "RescaleSlope",
    "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
)


def allowed_copy(source: Any, keywords: tuple[str, ...] | list[str]) -> Any:
    """A new dataset holding ``keywords`` of ``source``; sequences in ``ITEM_KEYWORDS`` keep only their allowed
    attributes, recursively. Per-frame items are kept even when empty, so frame ``i`` is still item ``i``."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    kept = Dataset()
    for keyword in keywords:
        if keyword not in source:
            continue
        if keyword in ITEM_KEYWORDS and source[keyword].VR == "SQ":
            setattr(kept, keyword, Sequence([allowed_copy(item, ITEM_KEYWORDS[keyword]) for item in source[keyword].value]))
        else:
            kept[keyword] = source[keyword]
    return kept


def frame_view(ds: Any, index: int) -> Any:
    """The display attributes of frame ``index``: each functional group from the frame's own item, else from the
    shared item, else the top-level attributes (PS3.3 C.7.6.16). A group that is present replaces the top-level
    values it stands for (a Pixel Value Transformation replaces a Modality LUT Sequence, a Frame VOI LUT the window)."""
    view = allowed_copy(ds, DISPLAY_KEYWORDS)
    if hasattr(ds, "file_meta"):  # LUT data in OW needs the byte order
        view.file_meta = ds.file_meta
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    items = ([per_frame[index]] if index < len(per_frame) else []) + list(shared[:1])
    replaced = {"PixelValueTransformationSequence": ("ModalityLUTSequence", "RescaleSlope", "RescaleIntercept", "RescaleType"),
                "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence")}
    for group, top_level in replaced.items():
        source = next((item[group].value[0] for item in items if item.get(group)), None)
        if source is None:
            continue
        for keyword in top_level:
            if keyword in view:
                del view[keyword]
        for keyword in FRAME_GROUPS[group]:
            if keyword in source:
                view[keyword] = source[keyword]
    return view
