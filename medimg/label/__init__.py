"""medimg on a MONAI Label server: every exported bundle as an infer task, a train task per bundle.

- :mod:`medimg.label.main` is the MONAI Label app (``MedimgApp``, a direct ``MONAILabelApp``
  subclass, as MONAI Label's app loader requires).
- :mod:`medimg.label.infer` turns bundles into infer tasks: automatic segmentation, interactive 2D
  (LiteMedSAM, MedSAM) and 3D (medsam3d) models, classification.
- :mod:`medimg.label.train` fine-tunes a bundle on the datastore's labels with ``medimg.train`` and
  publishes the new bundle atomically (:mod:`medimg.label.publish`).
- :mod:`medimg.label.serve` is ``python -m medimg.label serve``: the real MONAI Label server,
  bound to 127.0.0.1 by default, offline.

MONAI Label itself is the optional extra ``[label]``; nothing here is imported by ``import medimg``.
"""
