/*
 * A POSIX (pax) tar writer for the agent's READ_FILE of a directory.
 */
#ifndef DATAPLANE_TAR_H
#define DATAPLANE_TAR_H

/* Writes the tree below the directory `dirfd` to `out` as a pax archive: the directory
 * itself as "./", then files, directories and symlinks ("./a", "./sub/", ...) with mode,
 * owner and mtime; other kinds are left out and symlinks are not followed.  Returns 0,
 * or the errno of the first entry that could not be archived (the archive is complete
 * apart from it) or of a failed write (the archive is cut short). */
int tar_tree(int dirfd, int out);

#endif
