"""The five tabs of the studio; each module builds its components and wires its handlers."""
