"""Exporters: EAP-IG / MIB graphs (JSON, .pt), networkx (GraphML, GEXF, node-link), DOT, tables."""

from pathdb.export.common import ExportError
from pathdb.export.dot import to_dot, write_dot
from pathdb.export.eap import EapGraph, eap_spec, from_eap_json, from_eap_pt, to_eap_json, to_eap_pt
from pathdb.export.html import to_html, write_html
from pathdb.export.nx import read_graph, to_networkx, write_graph
from pathdb.export.tables import read_table, write_table

__all__ = [
    "EapGraph",
    "ExportError",
    "eap_spec",
    "from_eap_json",
    "from_eap_pt",
    "read_graph",
    "read_table",
    "to_dot",
    "to_eap_json",
    "to_eap_pt",
    "to_html",
    "to_networkx",
    "write_dot",
    "write_graph",
    "write_html",
    "write_table",
]
