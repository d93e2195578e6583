/* CURVE key files: one 40-character Z85 key (ZeroMQ's encoding of a 32-byte Curve25519
 * key) on one line, with or without a trailing newline. `fasa keygen NAME` writes a pair,
 * NAME.pub (mode 0644) and NAME.key (mode 0600); fasa-server reads its secret key and the
 * clients' public keys, the CLI the server's public key and its own secret key.
 *
 * A secret key file must not be open to group or other (like ssh's private keys): reading
 * one refuses it otherwise, naming the file and its mode. No ZeroMQ here (the charset is
 * checked, the key is not decoded), so the CLI and the tests can use it without a socket. */
#ifndef FASA_COORD_KEYFILE_H
#define FASA_COORD_KEYFILE_H

#include <stddef.h>

#define FASA_KEY_Z85_LEN 40 /* characters of a Z85-encoded 32-byte key */

/* 1 when the n bytes of s are a Z85 key: exactly FASA_KEY_Z85_LEN characters of the Z85
 * alphabet; 0 otherwise. */
int fasa_key_z85_valid(const char *s, size_t n);

/* Reads the key file at path into key (FASA_KEY_Z85_LEN characters and a NUL). secret: the
 * file holds a secret key, and group/other permission bits refuse it. Returns 0, or -1
 * with one line naming the file in err (missing, unreadable, not a regular file, too
 * open, wrong length, a character outside Z85, more than one line). key is written only on
 * success. */
int fasa_keyfile_read(const char *path, int secret, char key[FASA_KEY_Z85_LEN + 1], char *err,
                      size_t err_len);

/* Writes key and a newline to a new file at path with mode 0600 (secret) or 0644, created
 * with O_CREAT|O_EXCL so that a secret key is never readable by others, not even for a
 * moment. force: an existing file is removed first (else refused with EEXIST). Returns 0,
 * or -1 with one line naming the file in err (the file is removed again on a failed write).
 */
int fasa_keyfile_write(const char *path, const char *key, int secret, int force, char *err,
                       size_t err_len);

#endif
