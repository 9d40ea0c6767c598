"""Generated from protos/docket/v1 by scripts/gen_protos.sh. Do not edit."""
