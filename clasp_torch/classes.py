"""Class tables of the evaluation datasets: COCO-Stuff fine (182) and coarse (27) names, the
fine-to-coarse mapping, ADE20K (150) names. See :mod:`clasp_torch.data` for the source of the
27-class coarse mapping (STEGO's ``fine_to_coarse``, the official COCO-Stuff hierarchy).

Example:
    >>> len(COCOSTUFF_FINE_NAMES), len(COCOSTUFF_COARSE_NAMES), len(ADE20K_NAMES)
    (182, 27, 150)
    >>> COCOSTUFF_COARSE_NAMES[COCOSTUFF_FINE_TO_COARSE[0]]
    'person'
"""

from __future__ import annotations

__all__ = ["COCOSTUFF_FINE_NAMES", "COCOSTUFF_COARSE_NAMES", "COCOSTUFF_FINE_TO_COARSE", "ADE20K_NAMES"]

# --------------------------------------------------------------------------------------------
# Class tables
# --------------------------------------------------------------------------------------------

# COCO thing categories by COCO id 1..91 (ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91 are
# defined in the COCO paper but never annotated), then the 91 COCO-Stuff stuff classes (ids
# 92..182). Fine label = COCO id - 1.
_COCO_THINGS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench",
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    "hat", "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "mirror",
    "dining table", "window", "desk", "toilet", "door", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "blender",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "hair brush",
)  # fmt: skip
_COCO_STUFF = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence",
    "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog",
    "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house",
    "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net",
    "paper", "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield",
    "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea",
    "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)  # fmt: skip
COCOSTUFF_FINE_NAMES: tuple[str, ...] = _COCO_THINGS + _COCO_STUFF
"""The 182 COCO-Stuff fine class names, indexed by fine label (COCO id - 1)."""

# Supercategory -> members. Things are contiguous runs of fine ids (inclusive ranges); stuff
# classes are listed by name. Order = coarse id.
_THING_SUPERCATEGORIES: tuple[tuple[str, tuple[int, int]], ...] = (
    ("electronic", (71, 76)),
    ("appliance", (77, 82)),
    ("food-things", (51, 60)),
    ("furniture-things", (61, 70)),
    ("indoor", (83, 90)),
    ("kitchen", (43, 50)),
    ("accessory", (25, 32)),
    ("animal", (15, 24)),
    ("outdoor", (9, 14)),
    ("person", (0, 0)),
    ("sports", (33, 42)),
    ("vehicle", (1, 8)),
)
_STUFF_SUPERCATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ceiling", ("ceiling-other", "ceiling-tile")),
    ("floor", ("carpet", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood")),
    ("food-stuff", ("food-other", "fruit", "salad", "vegetable")),
    ("furniture-stuff", ("cabinet", "counter", "cupboard", "desk-stuff", "door-stuff",
                         "furniture-other", "light", "mirror-stuff", "shelf", "stairs", "table")),
    ("rawmaterial", ("cardboard", "metal", "paper", "plastic")),
    ("textile", ("banner", "blanket", "cloth", "clothes", "curtain", "mat", "napkin", "pillow",
                 "rug", "textile-other", "towel")),
    ("wall", ("wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone",
              "wall-tile", "wall-wood")),
    ("window", ("window-blind", "window-other")),
    ("building", ("bridge", "building-other", "house", "roof", "skyscraper", "tent")),
    ("ground", ("dirt", "gravel", "ground-other", "mud", "pavement", "platform", "playingfield",
                "railroad", "road", "sand", "snow")),
    ("plant", ("branch", "bush", "flower", "grass", "leaves", "moss", "plant-other", "straw",
               "tree")),
    ("sky", ("clouds", "sky-other")),
    ("solid", ("hill", "mountain", "rock", "solid-other", "stone", "wood")),
    ("structural", ("cage", "fence", "net", "railing", "structural-other")),
    ("water", ("fog", "river", "sea", "water-other", "waterdrops")),
)  # fmt: skip

COCOSTUFF_COARSE_NAMES: tuple[str, ...] = tuple(n for n, _ in _THING_SUPERCATEGORIES) + tuple(
    n for n, _ in _STUFF_SUPERCATEGORIES
)
"""The 27 COCO-Stuff coarse (supercategory) names, indexed by coarse label."""


def _build_fine_to_coarse() -> tuple[int, ...]:
    table = [-1] * len(COCOSTUFF_FINE_NAMES)
    for coarse, (_, (lo, hi)) in enumerate(_THING_SUPERCATEGORIES):
        for fine in range(lo, hi + 1):
            table[fine] = coarse
    index = {name: i for i, name in enumerate(COCOSTUFF_FINE_NAMES)}
    offset = len(_THING_SUPERCATEGORIES)
    for coarse, (_, members) in enumerate(_STUFF_SUPERCATEGORIES, start=offset):
        for name in members:
            table[index[name]] = coarse
    if min(table) < 0:  # pragma: no cover - guarded by tests
        raise AssertionError("COCO-Stuff coarse table does not cover every fine class")
    return tuple(table)


COCOSTUFF_FINE_TO_COARSE: tuple[int, ...] = _build_fine_to_coarse()
"""``COCOSTUFF_FINE_TO_COARSE[fine]`` is the coarse (0..26) label of COCO-Stuff fine label 0..181."""

ADE20K_NAMES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
"""The 150 ADE20K (SceneParsing / ADEChallengeData2016) class names, indexed by label 0..149."""
