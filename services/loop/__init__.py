"""`loopmesh run`: the whole loop on one machine, watched live in the terminal."""
