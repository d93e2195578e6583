/* See keyfile.h. A key file is small and read once at start, so it is read whole with one
 * bounded read from the descriptor that fstat checked (no gap between check and read). */
#include "keyfile.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char s_z85[] = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                            ".-:+=^!/*?&<>()[]{}@%$#";

int fasa_key_z85_valid(const char *s, size_t n)
{
    if (!s || n != FASA_KEY_Z85_LEN) return 0;
    for (size_t i = 0; i < n; i++)
        if (!s[i] || !strchr(s_z85, s[i])) return 0;
    return 1;
}

int fasa_keyfile_read(const char *path, int secret, char key[FASA_KEY_Z85_LEN + 1], char *err,
                      size_t err_len)
{
    const char *kind = secret ? "secret key file" : "public key file";
    const int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        snprintf(err, err_len, "%s %s: %s", kind, path, strerror(errno));
        return -1;
    }
    struct stat st;
    char buf[FASA_KEY_Z85_LEN + 3]; /* the key, "\r\n", and one byte to see more */
    ssize_t n = -1;
    int rc = -1;
    if (fstat(fd, &st)) {
        snprintf(err, err_len, "%s %s: %s", kind, path, strerror(errno));
    } else if (!S_ISREG(st.st_mode)) {
        snprintf(err, err_len, "%s %s: not a regular file", kind, path);
    } else if (secret && (st.st_mode & 077)) {
        snprintf(err, err_len,
                 "%s %s: permissions %04o are too open (group or other may access it); "
                 "run chmod 600 %s",
                 kind, path, (unsigned)(st.st_mode & 07777), path);
    } else if ((n = read(fd, buf, sizeof(buf))) < 0) {
        snprintf(err, err_len, "%s %s: %s", kind, path, strerror(errno));
    } else {
        size_t len = (size_t)n;
        if (len > 0 && buf[len - 1] == '\n') len--;
        if (len > 0 && buf[len - 1] == '\r') len--;
        if ((size_t)n == sizeof(buf) || len != FASA_KEY_Z85_LEN)
            snprintf(err, err_len,
                     "%s %s: expected one line of %d Z85 characters (a 'fasa keygen' key), "
                     "found %s%zd bytes",
                     kind, path, FASA_KEY_Z85_LEN, (size_t)n == sizeof(buf) ? "at least " : "", n);
        else if (!fasa_key_z85_valid(buf, len))
            snprintf(err, err_len,
                     "%s %s: the key has a character outside the Z85 alphabet (not a "
                     "'fasa keygen' key)",
                     kind, path);
        else {
            memcpy(key, buf, FASA_KEY_Z85_LEN);
            key[FASA_KEY_Z85_LEN] = '\0';
            rc = 0;
        }
    }
    close(fd);
    return rc;
}

int fasa_keyfile_write(const char *path, const char *key, int secret, int force, char *err,
                       size_t err_len)
{
    if (!fasa_key_z85_valid(key, key ? strlen(key) : 0)) {
        snprintf(err, err_len, "%s: not a Z85 key", path);
        return -1;
    }
    if (force && unlink(path) && errno != ENOENT) {
        snprintf(err, err_len, "%s: cannot replace it: %s", path, strerror(errno));
        return -1;
    }
    const mode_t mode = secret ? 0600 : 0644;
    const int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode);
    if (fd < 0) {
        if (errno == EEXIST)
            snprintf(err, err_len, "%s: already exists (use --force to overwrite it)", path);
        else
            snprintf(err, err_len, "%s: %s", path, strerror(errno));
        return -1;
    }
    char line[FASA_KEY_Z85_LEN + 1];
    errno = 0;
    memcpy(line, key, FASA_KEY_Z85_LEN);
    line[FASA_KEY_Z85_LEN] = '\n';
    /* The umask may have taken bits off the mode; set it exactly. The file was never more
     * open than mode, so a secret key was never readable by others. */
    int bad =
        write(fd, line, sizeof(line)) != (ssize_t)sizeof(line) || fchmod(fd, mode) || fsync(fd);
    int e = errno;
    if (close(fd) && !bad) {
        bad = 1;
        e = errno;
    }
    if (bad) {
        snprintf(err, err_len, "%s: cannot write it: %s", path, e ? strerror(e) : "short write");
        unlink(path);
        return -1;
    }
    return 0;
}
