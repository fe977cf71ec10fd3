"""Flex-template entry point: ``daco build`` with the template's parameters.

The launcher passes every parameter as ``--name=value``, together with the pipeline options
(``--runner``, ``--project``, ``--region``, ``--temp_location``, ...); ``daco build`` takes its
own (``--preset``, ``--out``, ``--shards``, ``--embeddings``, ``--accelerator``) and hands the
rest to Beam. Options are checked (pipeline/dataflow.py) before any job is submitted.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["build", *sys.argv[1:]]))
