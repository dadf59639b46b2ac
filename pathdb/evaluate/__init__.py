"""Judge circuits the way the field does (MIB / EAP-IG): edge-masked evaluation, faithfulness
curves, CPR and CMD, stored evaluations and run comparison.

Modules: :mod:`~pathdb.evaluate.masked` (the edge-masked forward), :mod:`~pathdb.evaluate.curves`
(curves, areas), :mod:`~pathdb.evaluate.session` (a run's model, metric and evaluation prompts),
:mod:`~pathdb.evaluate.storage` (tables), :mod:`~pathdb.evaluate.compare`, :mod:`~pathdb.evaluate.plot`,
:mod:`~pathdb.evaluate.groups` (receiver group effects: the default ``group`` edge rule) and
:mod:`~pathdb.evaluate.heldout` (the bundled ``toy-ioi-heldout`` prompt set).
"""
