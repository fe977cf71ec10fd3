"""``daco report OUT [--concepts ID,...] [--layer L]``: a static HTML report of an output folder.

Writes ``OUT/report/`` (index.html, gallery pages per concept group, figures/*.png,
thumbs/*.jpg) and adds a "Figures" section to ``OUT/README.md``; see ``pipeline/report.py``.
Open ``OUT/report/index.html`` in a browser straight from disk. A bad folder, concept or
layer is refused with the reason, exit status 2.
"""

HELP = "Write a static HTML report (run summary, concept map, layer statistics, stimulus gallery) into OUT/report/."


def add_arguments(parser):
    parser.add_argument("out", help="output folder of `daco build` (local path or gs:// URL)")
    parser.add_argument("--concepts", default=None,
                        help="comma-separated concept ids for the gallery (default: every concept)")
    parser.add_argument("--layer", type=int, default=None,
                        help="layer of the concept map (default: the middle layer of the dictionary)")
    parser.add_argument("--no-card", action="store_true", help="leave OUT/README.md unchanged")


def run(args, beam_args):
    import sys

    from pipeline.report import ReportError, make_report

    concepts = None if args.concepts is None else [c.strip() for c in args.concepts.split(",") if c.strip()]
    try:
        report = make_report(args.out, concept_ids=concepts, layer=args.layer, update_card=not args.no_card)
    except (ReportError, KeyError) as exc:
        print(f"daco report: {str(exc).strip(chr(34) + chr(39))}", file=sys.stderr)
        return 2
    print(f"report: {report.index} (concept map of layer {report.layer}; {len(report.gallery_pages)} gallery "
          f"page(s); thumbnails: {report.thumbs_written} written, {report.thumbs_reused} reused, "
          f"{report.thumbs_missing} without an image)")
    for name, path in report.figures.items():
        print(f"  figure {name}: {path}")
    return 0
