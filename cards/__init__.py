"""CDS Hooks cards and Da Vinci CRD system actions built from decisions."""
