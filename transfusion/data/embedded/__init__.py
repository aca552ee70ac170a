"""The data that ships with the package, made on the fly: coloured shapes with captions (``shapes``), multi-object
scenes for GenEval's tasks (``scenes``), edits (``shape_edits``), stories (``stories``) and the news text (``text``)."""
