/* hello: prints one line on COM1 and resets through the i8042. */
#include "guest.h"

void guest_main(const struct hvm_start_info *si) {
    (void)si;
    puts("hello from guest\n");
}
