"""``pathdb serve``: a read-only, local web explorer of a pathdb store (runs, circuits, the search
tree, cross-prompt heatmaps, faithfulness curves, two runs side by side), and the data of the
self-contained HTML export.

:mod:`pathdb.serve.data` computes every answer with the query layer; :mod:`pathdb.serve.app` is
the Starlette application; :mod:`pathdb.serve.server` binds and runs it. The page's own HTML, JS
and CSS live in ``static/``; its one third-party library, plotly.js, comes from the ``plotly``
Python package.
"""
