"""The LightningDataModules, one a file: ``embedded`` (``TransfusionDataModule``: the embedded shapes or scenes and
text), ``image_text`` (real image-caption and text sources), ``edit``, ``story``, ``streaming`` (shards), ``image``
(images for autoencoders and CLIP), ``geneval`` (GenEval prompts for ``predict``); ``base`` and ``resumable`` hold
what they share."""
