"""Prints the IDNA encoding of a domain, and the machine it runs on."""
import platform

import idna

print(idna.encode("bücher.example").decode(), "on", platform.machine())
