"""The three modes of segmentation, each an implementation of :class:`sam_geo.run.tasks.Mode`:
prompted by a vector layer (:mod:`.prompted`), automatic with stitching
(:mod:`.automatic`) and text through a grounding detector (:mod:`.text`)."""
